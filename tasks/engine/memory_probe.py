"""Measure a model's training memory on this GPU: the probe a plan uses when the estimator has no formula
for the model's family (tasks/planning/measured.py turns what it measures into the plan's estimate).

The model is loaded as the method trains it (tasks/engine/modeling.load_for_training: full, LoRA or
4-bit QLoRA, with the same attention and kernels), then the trainer's own forward and backward
(train_loop.accumulate_gradients) run on random token rows packed to two micro-batch sizes with no
layer checkpointed; with every layer checkpointed, to those and 8 times them, and to those again with
one trained token a row (measured.py, CHECKPOINTED_PROBE_TOKENS says why). Each point reads the
allocator's peak above the loaded model. Otherwise every token is trained (the loss's worst case). One
warm-up pass first, so one-off allocations (cuBLAS workspaces, kernel autotuning) are not taken for
activations. Seconds: nine forward+backward passes of up to 16k tokens, after one load. Nothing of the model outlives the call (the plan trains next).
"""
from __future__ import annotations

import gc
import logging
import time

import torch

from tasks.data.tokenization import IGNORE_INDEX, Example
from tasks.engine.kernels import fused_kernels_available
from tasks.engine.modeling import load_for_training
from tasks.engine.loss import chunk_rows
from tasks.engine.train_loop import _fused_loss_transform, _release, accumulate_gradients
from tasks.planning.measured import CHECKPOINTED_PROBE_TOKENS, PROBE_TOKENS, MethodProbe, ProbePoint
from tasks.planning.methods import Method
from tasks.planning.settings import LoraSettings
from tasks.store.weight_safety import SAFE, ModelLoadingSettings

logger = logging.getLogger(__name__)


def probe_memory(path: str, method: Method | str, lora: LoraSettings, loading: ModelLoadingSettings = SAFE,
                 longest_row: int = PROBE_TOKENS[0], token_counts: tuple[int, ...] = PROBE_TOKENS,
                 log: logging.Logger | logging.LoggerAdapter = logger, device: str = "cuda",
                 checkpointed_counts: tuple[int, ...] = CHECKPOINTED_PROBE_TOKENS) -> MethodProbe | None:
    """What training `path` with `method` keeps on this GPU, measured on rows of up to `longest_row`
    tokens packed to `token_counts` (and `checkpointed_counts` with every layer checkpointed); None when
    the probe itself runs out of memory (the plan then keeps the conservative estimate for this method). On return nothing of the model is left: the plan
    stage trains in the same process next. (`device` "cpu" runs the same steps and reads no memory: the
    model's lifetime is checked there.)"""
    method = Method(method)
    started, model = time.perf_counter(), None
    _free(device)
    before = _allocated(device)
    try:
        model = load_for_training(path, method, device, lora, gradient_checkpointing=True, loading=loading)
        probe = _measure(model, method, _allocated(device) - before, longest_row, token_counts, checkpointed_counts,
                         device, started)
    except torch.OutOfMemoryError as error:
        _release(model)  # the error's traceback keeps the model reachable: empty its tensors now
        log.warning("memory probe of %s ran out of GPU memory (%s); its estimate stays conservative", method,
                    str(error).splitlines()[0][:200])
        return None
    finally:
        # The only reference left: _measure's locals (the decoder layers) are gone with its frame. The
        # layers are in reference cycles (peft, Liger's bound forwards), so only a collection frees them,
        # and it must run now: left to Python's, they stayed allocated through the next training (issue 16).
        del model
        _free(device)
    log.info("memory probe of %s: %s", method, probe.describe())
    return probe


def _measure(model, method: Method, weights: int, longest_row: int, token_counts: tuple[int, ...],
             checkpointed_counts: tuple[int, ...], device: str, started: float) -> MethodProbe:
    """The probe's passes on the loaded `model`: a warm-up, then its token counts with no layer and
    with every layer checkpointed. Holds the model's layers only while it runs (see probe_memory)."""
    model.train()
    layers = _checkpointing_layers(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    row = min(longest_row, min(token_counts))
    _step_bytes(model, _random_rows(min(token_counts), row, vocab), device)  # warm-up: one-off allocations
    # With every layer checkpointed, also the peak while a layer is recomputed: one trained token a row,
    # so that the loss's chunk of logits does not hide it (measured.CHECKPOINTED_PROBE_TOKENS).
    runs = {"plain": (False, True, token_counts), "checkpointed": (True, True, checkpointed_counts),
            "recomputed": (True, False, token_counts)}
    points = {}
    for run, (checkpointed, every_token, counts) in runs.items():
        for layer in layers:
            layer.gradient_checkpointing = checkpointed
        points[run] = [ProbePoint(tokens=t, step_bytes=_step_bytes(model, _random_rows(t, row, vocab, every_token),
                                                                   device)) for t in counts]
    return MethodProbe(
        method=method, gpu=torch.cuda.get_device_name() if device == "cuda" else device, layers=len(layers),
        weights_bytes=weights,
        optimizer_bytes=2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        checkpoint_input_bytes=_checkpoint_input_bytes(model, method),
        square_bytes_per_layer=_square_bytes(model), **_loss_chunk(model),
        **points,
        fused_kernels=fused_kernels_available(model.config.model_type, device),
        attention=str(model.config._attn_implementation), seconds=round(time.perf_counter() - started, 1))


def _step_bytes(model, rows: list[Example], device: str) -> int:
    """Peak allocated by one forward and backward over `rows` (one packed micro-batch), above what was
    allocated before it; the gradients are dropped after, as the trainer's optimizer step does. 0 on CPU."""
    model.zero_grad(set_to_none=True)
    base = _allocated(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    accumulate_gradients(model, rows, sum(len(r.input_ids) for r in rows), device)
    _allocated(device)  # synchronizes: the backward's kernels have finished
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    model.zero_grad(set_to_none=True)
    return peak


def _random_rows(tokens: int, row: int, vocab: int, every_token: bool = True) -> list[Example]:
    """Rows of `row` random tokens (the last one shorter) that pack to exactly `tokens`, every token
    trained, or (`every_token` False) only each row's last."""
    generator = torch.Generator().manual_seed(tokens)
    lengths = [row] * (tokens // row) + ([tokens % row] if tokens % row > 1 else [])
    lengths[-1] += tokens - sum(lengths)  # a remainder of one token joins the last row
    rows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    return [Example(input_ids=r, labels=r if every_token else [IGNORE_INDEX] * (len(r) - 1) + r[-1:], truncated=False)
            for r in rows]


def _checkpointing_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpoint_input_bytes(model, method: Method) -> int:
    """Per token, what a checkpointed layer keeps: its input, in the residual stream's dtype (fp32 for
    full fine-tuning's fp32 weights, the bf16 base's otherwise)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    return hidden * (4 if method == Method.FULL else 2)


def _square_bytes(model) -> int:
    """Eager attention (soft-capped logits) keeps, per layer, a bf16 score matrix and fp32 probabilities per
    head over the micro-batch's tokens squared (as memory.eager_attention_bytes counts); 0 for other attention."""
    if model.config._attn_implementation != "eager":
        return 0
    return model.config.get_text_config().num_attention_heads * (2 + 4)


def _loss_chunk(model) -> dict:
    """The fused loss's chunk (tasks/engine/loss.py): fp32 logits and their bf16 gradient for each of up to
    chunk_rows tokens, and a soft cap's fp32 slope; none when the model's own head makes the logits."""
    transform = _fused_loss_transform(model, model.get_output_embeddings())
    if transform is None:
        return {}
    vocab = model.get_output_embeddings().weight.shape[0]
    return {"loss_chunk_tokens": chunk_rows(vocab),
            "loss_chunk_bytes_per_token": vocab * (6 + (4 if transform["softcap"] is not None else 0))}


def _allocated(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _free(device: str) -> None:
    gc.collect()  # adapters and hooks make reference cycles
    if device == "cuda":
        torch.cuda.empty_cache()
