"""Cross-entropy over a large vocabulary without materialising the logits.

The vocabulary projection of every answer token is the largest tensor of a training step for
modern vocabularies (128k entries: 0.5 MB per token in fp32, plus its gradient). Here the projection,
the log-softmax and its gradient are done a chunk of tokens at a time during the forward pass; only
the gradient with respect to the hidden states (and the head's weight, when it trains) is kept for
backward. Same arithmetic as `lm_head` + `F.cross_entropy(reduction="sum")`, in pure PyTorch, so it
runs on CPU and GPU alike.

Some families transform the logits before the softmax: a scale (Cohere's logit_scale, Granite's
1 / logits_scaling) and a soft cap, cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping);
both are applied here chunk by chunk, with their derivative in the gradient.
"""
from __future__ import annotations

import torch

from tasks.planning.memory import LOSS_CHUNK_BYTES

CHUNK_BYTES = LOSS_CHUNK_BYTES  # fp32 logits per chunk: bounds the extra memory, keeps the matmuls large


def chunk_rows(vocab_size: int) -> int:
    return max(64, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, scale=1.0, softcap=None):
        weight_c = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h = hidden[start:start + step].to(compute_dtype)
            target = targets[start:start + step]
            logits = _transformed(_fp32_product(h, weight_c.T), scale, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            # d(cap * tanh(z / cap))/dz = 1 - tanh(z / cap)^2, read off the capped logits before they are overwritten
            slope = None if softcap is None else 1 - (logits / softcap).square()
            # d(sum of losses)/d logits = softmax - one_hot(target), computed in place over the logits
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(target), device=probs.device), target] -= 1
            if slope is not None:
                probs.mul_(slope)
            if scale != 1.0:
                probs.mul_(scale)
            g = probs.to(compute_dtype)
            grad_hidden[start:start + step] = (g @ weight_c).to(hidden.dtype)
            if grad_weight is not None:
                _accumulate_product(grad_weight, g.T, h)
            del logits, probs, g, slope  # else they live on while the next chunk's logits are made: 2 chunks at once
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight, None, None, None, None


@torch.no_grad()
def _loss_only(hidden, weight, targets, compute_dtype, scale=1.0, softcap=None) -> torch.Tensor:
    weight_c = weight.to(compute_dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        logits = _transformed(_fp32_product(hidden[start:start + step].to(compute_dtype), weight_c.T), scale, softcap)
        target = targets[start:start + step]
        total += (torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)).sum()
    return total


# matmuls of 16-bit inputs with an fp32 output (torch 2.8 and later, CUDA)
FP32_OUTPUT_MATMULS = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


def _fp32_output(a: torch.Tensor) -> bool:
    """Whether cuBLAS can take 16-bit `a` and write its fp32 accumulator out directly."""
    return FP32_OUTPUT_MATMULS and a.is_cuda and a.dtype != torch.float32


def _fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32. On CUDA from 16-bit inputs cuBLAS writes its fp32 accumulator out directly (no
    16-bit product to round and then copy up: a pass over the chunk's logits saved)."""
    if _fp32_output(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _accumulate_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total (fp32) += a @ b. On CUDA in the matmul itself (beta = 1, fp32 output from 16-bit inputs):
    with a vocabulary of 128k, the head's gradient is 1 GiB, which a separate product, cast and add
    read and write several times over for every chunk of tokens."""
    if _fp32_output(a):
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total += (a @ b).float()


def _transformed(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    if scale != 1.0:
        logits = logits.mul_(scale)
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             compute_dtype: torch.dtype, scale: float = 1.0,
                             softcap: float | None = None) -> torch.Tensor:
    """sum_i CE(t(hidden[i] @ weight.T), targets[i]) for hidden (N, H), weight (V, H), targets (N,),
    where t(z) = softcap * tanh(scale * z / softcap), or scale * z without a soft cap."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, scale, softcap)
    return _loss_only(hidden, weight, targets, compute_dtype, scale, softcap)
