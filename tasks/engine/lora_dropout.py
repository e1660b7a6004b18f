"""LoRA's input dropout without a saved copy of the input per adapter.

peft computes `lora_B(lora_A(dropout(x)))`: for backward, `lora_A` keeps its own dropped-out copy
of `x` and the dropout keeps its mask, in every adapted projection (q, k and v each keep one of the
same input). That is a large share of a LoRA step's activation memory. Here `lora_A` applies the
dropout itself and keeps only `x`, which the projections share, plus an integer seed: backward
draws the same mask again. Same arithmetic, same weights, same saved adapter files.
"""
from __future__ import annotations

import torch


_GENERATORS: dict[torch.device, torch.Generator] = {}  # one per device, re-seeded per mask


def _mask(x: torch.Tensor, keep: float, seed: int) -> torch.Tensor:
    generator = _GENERATORS.get(x.device)
    if generator is None:
        generator = _GENERATORS[x.device] = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return torch.empty_like(x).bernoulli_(keep, generator=generator)


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p: float, seed: int):
        keep = 1.0 - p
        dropped = x * _mask(x, keep, seed) / keep
        ctx.save_for_backward(x, weight)
        ctx.keep, ctx.seed = keep, seed
        return dropped @ weight.to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        scaled_mask = _mask(x, ctx.keep, ctx.seed) / ctx.keep
        grad_out = grad_out.to(x.dtype)
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ (x * scaled_mask).reshape(-1, x.shape[-1])
        grad_x = (grad_out @ weight.to(x.dtype)) * scaled_mask
        return grad_x, grad_weight.to(weight.dtype), None, None


class DropoutLinear(torch.nn.Linear):
    """A LoRA `A` matrix that applies the adapter's input dropout itself (see module docstring)."""
    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p or not torch.is_grad_enabled():
            return super().forward(x)
        seed = int(torch.randint(0, 2**62, (1,)))  # from the CPU generator: seeded, checkpointed, resumed
        with torch.autocast(x.device.type, enabled=False):  # computes in x's dtype, as autocast would
            return _DropoutLinear.apply(x, self.weight, self.p, seed)


def fuse_lora_dropout(model) -> int:
    """Move each LoRA layer's dropout into its `A` matrix; returns how many layers changed."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            linear = module.lora_A[name]
            if isinstance(dropout, torch.nn.Identity):  # no dropout: peft would still keep an fp32 copy of x
                module.cast_input_dtype_enabled = False  # per adapter; autocast casts the weight instead
                continue
            if not isinstance(dropout, torch.nn.Dropout) or type(linear) is not torch.nn.Linear:
                continue
            linear.__class__ = DropoutLinear
            linear.p = dropout.p
            module.lora_dropout[name] = torch.nn.Identity()
            module.cast_input_dtype_enabled = False  # keep x as it is, so the projections share it
            changed += 1
    return changed
