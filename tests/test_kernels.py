"""Liger's patches stay with the model they were applied to (tasks/engine/kernels.py)."""
import types

import torch

from tasks.engine.kernels import kernel_options, patches_kept_to_cuda, use_fused_kernels


class Norm(torch.nn.Module):
    pass


class FusedNorm(torch.nn.Module):
    pass


def rope(q, k):
    return "original"


def fused_rope(q, k):
    if not q.is_cuda:
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")
    return "fused"


class OnCuda:
    is_cuda = True


def test_after_patching_only_cuda_tensors_reach_the_fused_kernels_and_classes_are_restored():
    modeling = types.ModuleType("modeling_tiny")
    modeling.Norm, modeling.rope, modeling.LAYERS = Norm, rope, 2
    for _ in range(2):  # a second model patches again: still one level of dispatch
        with patches_kept_to_cuda(modeling):
            modeling.Norm, modeling.rope = FusedNorm, fused_rope
    assert modeling.Norm is Norm and modeling.LAYERS == 2
    assert modeling.rope(torch.zeros(1), torch.zeros(1)) == "original"  # a model on the CPU
    assert modeling.rope(OnCuda(), OnCuda()) == "fused"
    assert modeling.rope.__wrapped_original__ is rope


def test_on_cpu_no_kernel_is_applied(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert use_fused_kernels(model, "cpu") == "none (CPU)"


def test_a_kernel_liger_leaves_off_for_a_family_is_not_asked_for():
    """Liger's apply function for GLM-4 defaults rope=False and raises if rope=True is passed; its
    defaults say what it has. The loss kernels stay off whatever the default (tasks/engine/loss.py)."""
    def apply_liger_kernel_to_glm4(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                   rms_norm=True, swiglu=True, model=None):
        if rope:
            raise NotImplementedError("liger_rotary_pos_emb is not available for Glm4 models.")

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=True, swiglu=True, model=None):
        pass

    glm4 = kernel_options(apply_liger_kernel_to_glm4)
    apply_liger_kernel_to_glm4(**glm4)
    assert glm4 == {"rope": False, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                    "fused_linear_cross_entropy": False}
    assert kernel_options(apply_liger_kernel_to_llama)["rope"] is True
