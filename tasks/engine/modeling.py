"""Loading models for training and inference: full, LoRA, or QLoRA (= LoRA on a 4-bit base).

On CUDA the frozen base runs in bf16; on CPU everything is fp32 (bf16 matmuls are slow on most
CPUs). tasks/planning/memory.py models exactly these choices: change them together.
"""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

from tasks.engine.attention import check_packing, use_packed_attention
from tasks.engine.kernels import use_fused_kernels
from tasks.engine.lora_dropout import fuse_lora_dropout
from tasks.planning.memory import FUSED_LOSS_MODEL_TYPES
from tasks.planning.methods import Method
from tasks.planning.settings import LoraSettings
from tasks.store.weight_safety import SAFE, ModelLoadingSettings, pretrained_kwargs, require_safe_weights


FULL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # full fine-tuning's weights, by full_precision


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def load_for_training(path: str, method: Method | str, device: str, lora: LoraSettings, gradient_checkpointing: bool,
                      loading: ModelLoadingSettings = SAFE, checkpointed_layers: int | None = None,
                      full_precision: str = "fp32"):
    """`full_precision` (full fine-tuning): "fp32" master weights, or "bf16" weights (trained by
    tasks/engine/bf16_adamw.py, which the train loop picks for bf16 parameters)."""
    method = Method(method)
    use_expandable_segments(device)
    require_safe_weights(path, loading)
    if method.quantized:
        model = _load_4bit(path, device, loading)
    else:
        # Full fine-tuning keeps fp32 master weights (bf16 autocast on CUDA) unless asked for bf16;
        # LoRA freezes a compute-dtype base.
        dtype = compute_dtype(device) if method.trains_adapter else FULL_DTYPES[full_precision]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device},
                                                     **pretrained_kwargs(loading))
    model = prepare_for_training(model, method, device, lora, gradient_checkpointing, checkpointed_layers)
    if device == "cuda":  # give back what loading cached (whole bf16 shards, for 4-bit): training starts lean
        torch.cuda.empty_cache()
    return model


def use_expandable_segments(device: str) -> None:
    """Let the CUDA allocator grow segments in place instead of caching fixed blocks.

    Packed micro-batches change shape every step; with fixed blocks the cache fragments and the
    process holds far more than it uses (tasks/planning/memory.py plans for what it holds). Left alone when
    the user configured the allocator (PYTORCH_ALLOC_CONF, or its older name PYTORCH_CUDA_ALLOC_CONF).
    """
    if device == "cuda" and not {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & set(os.environ):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def prepare_for_training(model, method: Method | str, device: str, lora: LoraSettings, gradient_checkpointing: bool,
                         checkpointed_layers: int | None = None):
    """Checkpointing (of the first `checkpointed_layers` decoder layers; None: all), packed attention
    and adapters on a loaded model (4-bit already for QLoRA).

    Not peft's prepare_model_for_kbit_training for QLoRA: it upcasts the embeddings, norms and
    output head to fp32, which costs memory and makes the vocabulary projection several times slower.
    """
    method = Method(method)
    model.config.use_cache = False  # the KV cache is for generation; it only costs memory here
    if method.trains_adapter:
        model.requires_grad_(False)
    if gradient_checkpointing:
        checkpoint_layers(model, checkpointed_layers)
    use_packed_attention(model, device)
    use_fused_kernels(model, device)
    if model.config.model_type not in FUSED_LOSS_MODEL_TYPES:  # a family the project has not checked packing for
        check_packing(model, device)
    if not method.trains_adapter:
        return model
    return attach_lora(model, lora)


def checkpoint_layers(model, layers: int | None) -> int:
    """Gradient checkpointing on the first `layers` decoder layers (None: all; 0: none); returns how many.

    The last layers run plainly: backward reaches them first and frees their activations before any
    checkpointed layer is recomputed. tasks/planning/memory.py counts a plain layer's activations and a
    checkpointed layer's input (plus the one being recomputed); the planner picks the fewest that fit.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if layers == 0:
        model.gradient_checkpointing_disable()
        return 0
    # Non-reentrant checkpointing needs no enable_input_require_grads() on a frozen base.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(decoder_layers):
        layer.gradient_checkpointing = layers is None or index < layers
    return len(decoder_layers) if layers is None else min(layers, len(decoder_layers))


def _load_4bit(path: str, device: str, loading: ModelLoadingSettings = SAFE):
    from transformers import BitsAndBytesConfig  # bitsandbytes itself is imported by transformers here

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=compute_dtype(device), device_map={"": device},
        **pretrained_kwargs(loading),
    )


# What LoRA adapts in a mixture of experts when asked for all linear layers: attention, and a shared
# expert's MLP where the family has one. Not the experts (peft would wrap each layer's fused expert
# tensors as one adapter of rank r x experts, which takes no dropout) nor the router (an adapted
# router moves tokens between frozen experts).
# (A regular expression on full module names: peft maps a plain "gate_proj" onto the experts' tensors.)
MOE_LORA_TARGETS = r".*\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|shared_expert\.(gate_proj|up_proj|down_proj))"


EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # the names families give it


def is_mixture_of_experts(config) -> bool:
    return any(getattr(config, name, None) for name in EXPERT_COUNT_FIELDS)


def attach_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    targets = lora.target_list()
    if targets == "all-linear" and is_mixture_of_experts(model.config):
        targets = MOE_LORA_TARGETS
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    fuse_lora_dropout(model)
    return model


def load_for_inference(path: str, device: str, adapter: str | None = None, dtype: torch.dtype | None = None,
                       quantized: bool = False, loading: ModelLoadingSettings = SAFE):
    """The base (4-bit when `quantized`, as QLoRA trained it), with the adapter on top if given."""
    require_safe_weights(path, loading)
    if adapter:  # checked before the base loads: refusing late wastes the load
        require_safe_weights(adapter, loading)
    if quantized:
        model = _load_4bit(path, device, loading)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or compute_dtype(device),
                                                     device_map={"": device}, **pretrained_kwargs(loading))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their logical size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count = count * 2  # two 4-bit values per stored byte
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total
