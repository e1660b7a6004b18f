"""Attention over packed rows: no token attends to another row of the same micro-batch.

On CUDA, PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen.varlen_attn`) takes
the row boundaries as cumulative lengths and skips cross-row work entirely. Elsewhere (CPU, or a
PyTorch without it), transformers' SDPA path builds a block-diagonal causal mask from the position
ids that restart at 0 for each row: the same result, with the quadratic mask.

Families whose attention does more than softmax(q k^T) v keep a path that computes it:
- logit soft-capping (Gemma 2): neither varlen FlashAttention nor SDPA has it, so the model keeps
  its eager attention, with the block-diagonal mask from the position ids (the score matrices of a
  micro-batch are kept: tasks/planning/memory.py counts them);
- sliding-window layers (Gemma 2/3, Cohere 2, Mistral and Qwen2 configs that set a window): varlen
  attention gets each layer's window when this PyTorch's varlen_attn takes one, else SDPA runs with
  transformers' masks (packed rows and windows both).
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

PACKED_VARLEN = "packed_varlen"
KEY_INDEX = "key_index"  # model keyword: the stream positions of each segment's keys (a shared prompt's twice)
logger = logging.getLogger(__name__)


def varlen_available(device: str) -> bool:
    if device != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (PyTorch >= 2.9)
    except ImportError:
        return False
    return True


def _packed_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """A transformers attention function: query (1, Hq, T, D), key/value (1, Hkv, T, D) ->
    (1, T, Hq, D). Rows are given by `cu_seq_lens_q` (the trainer passes it with the batch); a shared
    prompt's layout (tasks/engine/preference.py) adds each segment's key positions (`key_index`, counted
    by `cu_seq_lens_k`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq = kwargs.get("cu_seq_lens_q")
    key_index = kwargs.get(KEY_INDEX)
    if cu_seq is None or query.shape[0] != 1 or (dropout and module.training) or attention_mask is not None:
        if key_index is not None:
            raise ValueError("a shared-prompt layout needs the packed attention with its row boundaries")
        # generation, padded batches or attention dropout: the general path handles them
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cu_keys = kwargs.get("cu_seq_lens_k", cu_seq)
    if query.device.type != "cuda":  # the same attention with a dense mask: what CPU tests check layouts with
        return _segments_dense(query, key, value, cu_seq, cu_keys, key_index, scaling), None
    # FlashAttention takes 16-bit inputs only; full fine-tuning's fp32 residual stream reaches here
    # as fp32 after RoPE, so compute in autocast's dtype, as SDPA under autocast would.
    half = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (t[0].transpose(0, 1).to(half) for t in (query, key, value))  # (T, heads, D)
    if key_index is not None:  # a segment's keys: its own tokens after the shared prompt's
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _takes_grouped_heads():
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = _varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq, int(kwargs["max_length_q"]), scaling,
                  kwargs.get("sliding_window"), cu_keys, int(kwargs.get("max_length_k", kwargs["max_length_q"])))
    return out.unsqueeze(0), None


def _segments_dense(query, key, value, cu_queries, cu_keys, key_index, scaling):
    """Each segment's queries attend to its keys, causal from the end; SDPA with a dense mask, (1, T, H, D)."""
    length = query.shape[2]
    keys = key_index if key_index is not None else torch.arange(length, device=query.device)
    allowed = torch.zeros(length, length, dtype=torch.bool, device=query.device)
    for s in range(len(cu_queries) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_queries[s], cu_queries[s + 1], cu_keys[s], cu_keys[s + 1]))
        allowed[q0:q1, keys[k0:k1]] = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool,
                                                 device=query.device).tril((k1 - k0) - (q1 - q0))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _varlen(q, k, v, cu_seq, max_len: int, scale: float | None, sliding_window: int | None = None,
            cu_keys=None, max_keys: int | None = None):
    """Causal per segment; a segment with more keys than queries aligns them at the end (the last query
    sees every key): FlashAttention's causal mask for unequal lengths."""
    from torch.nn.attention.varlen import varlen_attn

    options = _varlen_options()
    extra = {"scale": scale}
    if "enable_gqa" in options:
        extra["enable_gqa"] = q.shape[1] != k.shape[1]
    if "window_size" in options:
        # causal; a sliding window sees itself and the window - 1 tokens before (transformers' masks)
        extra["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    elif sliding_window:
        raise RuntimeError("this PyTorch's varlen attention takes no window; use_packed_attention should not "
                           "have chosen it for a model with sliding-window layers")
    else:
        extra["is_causal"] = True
    if cu_keys is None:
        cu_keys, max_keys = cu_seq, max_len
    return varlen_attn(q, k, v, cu_seq, cu_keys, max_len, max_keys, **extra)


@functools.cache
def _takes_grouped_heads() -> bool:
    """Whether this PyTorch's varlen attention accepts fewer key/value heads than query heads
    (FlashAttention does; some versions' wrappers do not say so). Checked once on tiny tensors
    against repeated heads, so a wrong answer can never reach training."""
    q = torch.randn(16, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 16, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu_seq = torch.tensor([0, 7, 16], dtype=torch.int32, device="cuda")
    probe = torch.randn(16, 4, 64, device="cuda", dtype=torch.bfloat16)
    try:
        grouped = _varlen(q, k, v, cu_seq, 9, None)
        grouped_grad = torch.autograd.grad((grouped * probe).sum(), k)[0]
    except (RuntimeError, ValueError):
        return False
    repeated = _varlen(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), cu_seq, 9, None)
    repeated_grad = torch.autograd.grad((repeated * probe).sum(), k)[0]
    return torch.allclose(grouped, repeated, atol=2e-2) and torch.allclose(grouped_grad, repeated_grad, atol=5e-2)


def _packed_varlen_mask(*args, **kwargs):
    """No dense mask for packed rows (varlen needs none); SDPA's mask for padded batches."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


@functools.cache
def _varlen_options() -> set[str]:
    """The keyword arguments this PyTorch's varlen_attn takes (its signature changed across versions)."""
    from torch.nn.attention.varlen import varlen_attn

    return set(inspect.signature(varlen_attn).parameters)


def attention_needs(config) -> tuple[bool, bool]:
    """(logit soft-capping, sliding-window layers) of a model's attention, from its config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(config, "attn_logit_softcapping", None) is not None
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = bool(window) and "sliding_attention" in layer_types
    else:
        sliding = bool(window) and getattr(config, "use_sliding_window", True) is not False
    return softcap, sliding


def use_packed_attention(model, device: str, log=None) -> str:
    """Switch `model` to the fastest attention that respects packed rows (and computes what the
    model's own attention computes); returns its name, and logs why when it is a slower one."""
    softcap, sliding = attention_needs(model.config)
    if softcap:
        model.set_attn_implementation("eager")
        return _said(log, "eager (block-diagonal mask from position ids): the model soft-caps its attention "
                          "logits, which varlen FlashAttention and SDPA cannot; slower, and its memory grows with "
                          "the square of the micro-batch")
    if not varlen_available(device):
        return "sdpa (block-diagonal mask from position ids)"
    if sliding and "window_size" not in _varlen_options():
        return _said(log, "sdpa (block-diagonal and sliding-window masks from position ids): the model has "
                          "sliding-window layers and this PyTorch's varlen attention takes no window")
    # The probe runs autograd on its own tensors: here, not in the first forward, where gradient
    # checkpointing would count its saved tensors and then miss them in the recomputation.
    _takes_grouped_heads()
    install_packed_attention(model)
    return f"{PACKED_VARLEN} (torch varlen FlashAttention)"


def install_packed_attention(model) -> None:
    """Give `model` this module's attention over segments: varlen FlashAttention on CUDA, the same
    computed with a dense mask elsewhere (how CPU tests check what the segments compute)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_VARLEN, _packed_varlen_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_VARLEN, _packed_varlen_mask)
    model.set_attn_implementation(PACKED_VARLEN)


PACKING_EXACT = "_finetune_packing_exact"  # attribute set on a model: whether packed rows stay apart


@torch.no_grad()
def check_packing(model, device: str, log=None) -> bool:
    """Whether a row's logits are the same packed after another row as alone, measured on `model`.

    For families whose decoder is not known to keep packed rows apart (tasks/planning/memory.py,
    FUSED_LOSS_MODEL_TYPES): a state-space or hybrid model carries its state across the row
    boundary, and a family's attention may ignore the position ids. When they differ, the trainer
    runs each row of a micro-batch on its own (tasks/engine/train_loop.py): slower, and correct."""
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(min(3, vocab - 1), vocab, (n,), generator=generator) for n in (19, 33))
    # In training mode: in eval mode bitsandbytes repacks 4-bit weights on CPU for inference, in a
    # layout training cannot use. (A base with dropout then reads as inexact: the slower path, still correct.)
    was_training = model.training
    model.train()
    try:
        alone = _probe_logits(model, second, [len(second)], device)
        packed = _probe_logits(model, torch.cat([first, second]), [len(first), len(second)], device)[len(first):]
    finally:
        model.train(was_training)
    tolerance = (2e-2 if device == "cuda" else 1e-4) * max(alone.abs().max().item(), 1.0)
    exact = bool((packed - alone).abs().max().item() <= tolerance)
    setattr(model, PACKING_EXACT, exact)
    if not exact:
        _said(log, f"{model.config.model_type}: a row's logits change when another row is packed before it "
                   "(state carried across rows, or attention that ignores position ids); each row of a "
                   "micro-batch runs on its own: slower, and correct")
    return exact


def _probe_logits(model, ids: torch.Tensor, lengths: list[int], device: str) -> torch.Tensor:
    """Logits of packed rows, given as the trainer gives them (tasks/engine/train_loop.py)."""
    batch = {"input_ids": ids[None].to(device),
             "position_ids": torch.cat([torch.arange(n) for n in lengths])[None].to(device)}
    if device == "cuda":
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens(lengths, device)
        batch["max_length_q"] = batch["max_length_k"] = max(lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        return model(**batch, use_cache=False).logits[0].float()


def _said(log, what: str) -> str:
    (log or logger).info("attention: %s", what)
    return what


def cu_seq_lens(lengths: list[int], device: str) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)
