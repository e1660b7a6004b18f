"""Fused GPU kernels for the decoder's element-wise work, from Liger (liger-kernel), when installed.

RMSNorm, RoPE and the SwiGLU MLP are chains of small memory-bound operations in transformers'
PyTorch code; Liger's Triton kernels do each in one pass and keep less for backward (RMSNorm saves
its 16-bit input instead of an fp32 copy, SwiGLU recomputes the activation). Optional: install the
`gpu` extra. The vocabulary projection is fused with the loss by tasks/engine/loss.py, not by Liger, so
the same code runs on CPU. Liger patches the model classes of its module as well as this instance.
"""
from __future__ import annotations

import inspect

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
    accepted = inspect.signature(apply).parameters
    options = {k: v for k, v in FUSED.items() if k in accepted}
    apply(model=model, **options)
    return "liger: " + ", ".join(k for k, v in options.items() if v)


def _liger_functions() -> dict:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return {}
    return MODEL_TYPE_TO_APPLY_LIGER_FN
