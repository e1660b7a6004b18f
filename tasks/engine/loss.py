"""Cross-entropy over a large vocabulary without materialising the logits.

The vocabulary projection of every answer token is the largest tensor of a training step for
modern vocabularies (128k entries: 0.5 MB per token in fp32, plus its gradient). Here the projection,
the log-softmax and its gradient are done a chunk of tokens at a time during the forward pass; only
the gradient with respect to the hidden states (and the head's weight, when it trains) is kept for
backward. Same arithmetic as `lm_head` + `F.cross_entropy(reduction="sum")`, in pure PyTorch, so it
runs on CPU and GPU alike.
"""
from __future__ import annotations

import torch

from tasks.planning.memory import LOSS_CHUNK_BYTES

CHUNK_BYTES = LOSS_CHUNK_BYTES  # fp32 logits per chunk: bounds the extra memory, keeps the matmuls large


def chunk_rows(vocab_size: int) -> int:
    return max(64, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype):
        weight_c = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h = hidden[start:start + step].to(compute_dtype)
            target = targets[start:start + step]
            logits = (h @ weight_c.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            # d(sum of losses)/d logits = softmax - one_hot(target), computed in place over the logits
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(target), device=probs.device), target] -= 1
            g = probs.to(compute_dtype)
            grad_hidden[start:start + step] = (g @ weight_c).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (g.T @ h).float()
            del logits, probs, g  # else they live on while the next chunk's logits are made: 2 chunks at once
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight, None, None


@torch.no_grad()
def _loss_only(hidden, weight, targets, compute_dtype) -> torch.Tensor:
    weight_c = weight.to(compute_dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        logits = (hidden[start:start + step].to(compute_dtype) @ weight_c.T).float()
        target = targets[start:start + step]
        total += (torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)).sum()
    return total


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             compute_dtype: torch.dtype) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T, targets[i]) for hidden (N, H), weight (V, H), targets (N,)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype)
    return _loss_only(hidden, weight, targets, compute_dtype)
