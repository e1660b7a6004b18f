"""AdamW for bf16 weights with no fp32 master copy: 8 bytes a parameter instead of 16.

Full fine-tuning with fp32 master weights holds 4 bytes of weight, 4 of gradient and 8 of AdamW
moments a parameter; trained in bf16 (weights, gradients and both moments) it holds 8, as the seed
recipe's pure-bf16 Trainer does. Plain bf16 AdamW loses updates: a weight moves only when its update
is more than half a bf16 step (1/256 of its size), and the second moment, decayed by 0.999 a step,
never decays at all. Here the update is computed in fp32 and every result (weight and both moments)
is rounded to bf16 stochastically: up with probability equal to its distance from the bf16 value
below, so its expectation is the fp32 result and small updates add up over steps as in fp32.

On CUDA one Triton kernel updates a tensor in one read and one write of each state (random bits
from Philox, in the kernel); on CPU the same arithmetic runs in torch, a chunk at a time. fp32
parameters among them (a family that keeps some modules in fp32) get the same update, unrounded.
Gradients still add up across micro-batches in bf16, rounded to nearest, as in any pure-bf16 run.
"""
from __future__ import annotations

import torch

CPU_CHUNK = 1 << 22  # elements updated at a time on the CPU: bounds the fp32 working copies


def round_stochastically(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random with probability by distance: unbiased.

    A bf16 value is an fp32 value with its low 16 bits zero. Adding a uniform 16-bit integer to the
    bits and clearing them rounds the magnitude up exactly when the noise reaches the distance to the
    next bf16 value (the carry moves into the kept bits): with that probability."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def adamw_update(weight, grad, exp_avg, exp_avg_sq, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step_size: float, correction2: float) -> None:
    """One AdamW update (decoupled weight decay; `step_size` = lr / (1 - beta1^t), `correction2` = 1 - beta2^t)
    of a weight and its moments, in place, computed in fp32 and stored rounded stochastically where they are
    bf16. The CPU's path (and fp32 parameters' on CUDA), and the reference of the CUDA kernel."""
    views = [weight.view(-1), grad.reshape(-1), exp_avg.view(-1), exp_avg_sq.view(-1)]  # in place: views only
    for start in range(0, views[0].numel(), CPU_CHUNK):
        w, g, m, v = (t[start:start + CPU_CHUNK] for t in views)
        g32 = g.float()
        m32 = m.float() * beta1 + g32 * (1 - beta1)
        v32 = v.float() * beta2 + g32 * g32 * (1 - beta2)
        w32 = w.float() * (1 - lr * weight_decay) - step_size * m32 / ((v32 / correction2).sqrt() + eps)
        for target, value in ((w, w32), (m, m32), (v, v32)):
            target.copy_(round_stochastically(value) if target.dtype == torch.bfloat16 else value)


TRAINED_DTYPES = (torch.bfloat16, torch.float32)


class Bf16AdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters (fp32 ones alongside), moments kept in the parameter's dtype, every bf16
    result rounded stochastically (see the module's docstring). Its state_dict saves and loads as any torch
    optimizer's, so checkpoints resume it."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.dtype not in TRAINED_DTYPES:
                    raise TypeError(f"Bf16AdamW trains bf16 (and fp32) parameters; got {parameter.dtype} "
                                    f"(a {tuple(parameter.shape)} tensor)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.tensor(0.0)  # on the CPU, as torch's AdamW keeps it: read without a sync
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
                state["step"] += 1
                step = int(state["step"].item())
                kernel = parameter.is_cuda and parameter.dtype == torch.bfloat16
                (_cuda_update if kernel else adamw_update)(
                    parameter, parameter.grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1,
                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    step_size=group["lr"] / (1 - beta1 ** step), correction2=1 - beta2 ** step)
        return loss


def _cuda_update(weight, grad, exp_avg, exp_avg_sq, **hyperparameters) -> None:
    from tasks.engine.bf16_adamw_kernel import update_on_cuda  # Triton: imported on CUDA only

    if not (weight.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError(f"Bf16AdamW's kernel updates contiguous tensors; a {tuple(weight.shape)} weight is not")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from torch's generator: a seeded run repeats
    update_on_cuda(weight, grad.contiguous(), exp_avg, exp_avg_sq, seed=seed, **hyperparameters)
