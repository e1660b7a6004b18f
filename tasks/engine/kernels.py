"""Fused GPU kernels for the decoder's element-wise work, from Liger (liger-kernel), when installed.

RMSNorm, RoPE and the SwiGLU MLP are chains of small memory-bound operations in transformers'
PyTorch code; Liger's Triton kernels do each in one pass and keep less for backward (RMSNorm saves
its 16-bit input instead of an fp32 copy, SwiGLU recomputes the activation). Optional: install the
`gpu` extra. The vocabulary projection is fused with the loss by tasks/engine/loss.py, not by Liger, so
the same code runs on CPU.

Liger patches the modeling module (its RMSNorm and MLP classes, its RoPE function) as well as the
instance. Left so, every later model of that family in the process would run Triton kernels, a
model loaded on the CPU too (the publish stage merges on the CPU when an fp32 copy does not fit the
GPU) and fail there. So only this instance keeps Liger's modules: the module's classes go back to
transformers' own, and a replaced function runs Liger's kernel on CUDA tensors and the original on
any other.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys

FUSED = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
         "fused_linear_cross_entropy": False}


def fused_kernels_available(model_type: str, device: str) -> bool:
    """Whether use_fused_kernels will apply Liger's kernels to a model of this type (the memory
    estimate depends on it: fused kernels keep less for backward)."""
    return device == "cuda" and model_type in _liger_functions()


def use_fused_kernels(model, device: str) -> str:
    """Apply Liger's kernels to `model` (before adapters are attached); says what was done."""
    if device != "cuda":
        return "none (CPU)"
    functions = _liger_functions()
    if not functions:
        return "none (liger-kernel not installed: pip install 'prefect-finetune[gpu]')"
    apply = functions.get(model.config.model_type)
    if apply is None:
        return f"none (Liger has no kernels for {model.config.model_type})"
    options = kernel_options(apply)
    modeling = sys.modules[type(getattr(model, model.base_model_prefix, model)).__module__]
    with patches_kept_to_cuda(modeling):
        apply(model=model, **options)
    return "liger: " + ", ".join(k for k, v in options.items() if v)


def kernel_options(apply) -> dict[str, bool]:
    """The FUSED kernels to ask of one of Liger's `apply_liger_kernel_to_*` functions. A kernel it turns
    off by default for a family is one it lacks there (GLM-4's RoPE raises NotImplementedError when asked
    for, found on the H200): ask only for what its defaults allow."""
    accepted = inspect.signature(apply).parameters
    return {k: v and accepted[k].default is not False for k, v in FUSED.items() if k in accepted}


@contextlib.contextmanager
def patches_kept_to_cuda(module):
    """Undo, on leaving, what the block replaced in `module`: a class goes back to the original (the
    instances made meanwhile keep what they were given), a function becomes a dispatcher that calls
    the replacement for CUDA tensors and the original otherwise."""
    before = dict(vars(module))
    yield
    for name, original in before.items():
        replacement = vars(module).get(name)
        if replacement is original:
            continue
        original = getattr(original, "__wrapped_original__", original)
        if inspect.isclass(original) or not callable(replacement):
            setattr(module, name, original)
        else:
            setattr(module, name, _on_cuda(replacement, original))


def _on_cuda(replacement, original):
    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if hasattr(a, "is_cuda")), None)
        return (replacement if first is not None and first.is_cuda else original)(*args, **kwargs)

    dispatch.__wrapped_original__ = original
    return dispatch


def _liger_functions() -> dict:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return {}
    return MODEL_TYPE_TO_APPLY_LIGER_FN
