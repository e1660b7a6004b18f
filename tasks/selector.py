"""Choose method, micro-batch and gradient checkpointing from the memory estimate.

Quality first (full > lora > qlora), then speed: for a method, no checkpointing with the largest
micro-batch that fits beats checkpointing (which recomputes the forward pass). A forced method
that cannot fit fails here, before any weights are loaded. Pure: no torch, no Prefect.
"""
from __future__ import annotations

import math

from pydantic import BaseModel

from tasks.memory import GIB, MemoryEstimate, ModelShape, estimate_memory

METHODS_BY_QUALITY = ("full", "lora", "qlora")


class PlanError(ValueError):
    """No configuration fits the memory budget."""


class Candidate(BaseModel):
    estimate: MemoryEstimate
    fits: bool


class TrainingPlan(BaseModel):
    method: str
    device: str
    micro_batch_size: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    budget_bytes: int
    budget_source: str
    estimate: MemoryEstimate
    candidates: list[Candidate]  # the best configuration tried for each method
    reason: str

    def table(self) -> list[dict]:
        return [
            {
                "method": c.estimate.method,
                "micro_batch": c.estimate.micro_batch_size,
                "grad_checkpointing": c.estimate.gradient_checkpointing,
                "estimated_gib": round(c.estimate.gib, 2),
                "budget_gib": round(self.budget_bytes / GIB, 2),
                "fits": c.fits,
                "chosen": c.estimate.method == self.method,
            }
            for c in self.candidates
        ]


def select_plan(
    shape: ModelShape,
    *,
    budget_bytes: int,
    budget_source: str,
    device: str,
    method: str,
    seq_len: int,
    batch_size: int,
    micro_batch_size: int,
    gradient_checkpointing: str = "auto",
    lora_r: int = 16,
    lora_targets: list[str] | str = "all-linear",
    lora_dropout: float = 0.05,
) -> TrainingPlan:
    checkpointing = {"auto": (False, True), "off": (False,), "on": (True,)}[gradient_checkpointing]
    micro_batches = _halvings(min(micro_batch_size, batch_size))

    def best_for(m: str) -> Candidate:
        tried = None
        for ckpt in checkpointing:
            for mb in micro_batches:
                tried = estimate_memory(shape, m, device, mb, seq_len, ckpt, lora_r, lora_targets, lora_dropout)
                if tried.total <= budget_bytes:
                    return Candidate(estimate=tried, fits=True)
        return Candidate(estimate=tried, fits=False)  # the smallest configuration: what it needs at least

    # Every method is estimated, so the plan's table shows what else would (not) have fitted.
    candidates = [best_for(m) for m in METHODS_BY_QUALITY]
    allowed = [c for c in candidates if method in ("auto", c.estimate.method)]
    chosen = next((c for c in allowed if c.fits), None)
    budget = f"{budget_bytes / GIB:.2f} GiB ({budget_source})"
    if chosen is None:
        if method != "auto":
            needed = allowed[0].estimate
            fitting = [f"{c.estimate.method} ({c.estimate.gib:.2f} GiB)" for c in candidates if c.fits]
            hint = f"use {' or '.join(fitting)}" if fitting else "use a larger GPU"
            raise PlanError(
                f"method {method!r} needs at least {needed.gib:.2f} GiB (micro-batch 1, gradient checkpointing "
                f"{'on' if needed.gradient_checkpointing else 'off'}, {seq_len} tokens) but the budget is "
                f"{budget}; {hint}, lower max_seq_len, or set method to 'auto'"
            )
        smallest = min(candidates, key=lambda c: c.estimate.total)
        raise PlanError(
            f"no method fits: the smallest, {smallest.estimate.method}, needs {smallest.estimate.gib:.2f} GiB "
            f"at micro-batch 1 with {seq_len} tokens, but the budget is {budget}; "
            "use a GPU with more memory or lower max_seq_len"
        )
    est = chosen.estimate
    reason = (
        f"{est.method}: the {'requested' if method != 'auto' else 'highest-quality'} method that fits "
        f"{budget}; estimated peak {est.gib:.2f} GiB at micro-batch {est.micro_batch_size}, "
        f"{seq_len} tokens per row, gradient checkpointing {'on' if est.gradient_checkpointing else 'off'}"
    )
    return TrainingPlan(
        method=est.method, device=device, micro_batch_size=est.micro_batch_size,
        gradient_accumulation=math.ceil(batch_size / est.micro_batch_size),
        gradient_checkpointing=est.gradient_checkpointing, budget_bytes=budget_bytes,
        budget_source=budget_source, estimate=est, candidates=candidates, reason=reason,
    )


def _halvings(n: int) -> list[int]:
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


class WorkPoolSpec(BaseModel):
    """A Prefect work pool whose workers have GPUs of one size."""

    name: str
    gpu_gib: float  # memory of one GPU, as sold (e.g. 24, 80, 141)


def select_work_pool(shape: ModelShape, pools: list[WorkPoolSpec], *, safety: float = 0.9,
                     **plan_kwargs) -> tuple[WorkPoolSpec, TrainingPlan]:
    """The smallest pool whose GPU fits a plan, and that plan (`plan_kwargs` as for select_plan).

    Pools are tried from the smallest GPU up, each with `safety` of its memory as the budget, so a
    job that fits a 24 GiB card does not hold an 80 GiB one. Raises PlanError naming what each pool lacks.
    """
    if not pools:
        raise PlanError("no work pools given: list at least one pool with its GPU memory (name, gpu_gib)")
    failures = []
    for pool in sorted(pools, key=lambda p: p.gpu_gib):
        try:
            plan = select_plan(shape, budget_bytes=int(pool.gpu_gib * safety * GIB),
                               budget_source=f"{safety:.0%} of a {pool.gpu_gib:g} GiB GPU in work pool {pool.name!r}",
                               device="cuda", **plan_kwargs)
        except PlanError as error:
            failures.append(f"{pool.name} ({pool.gpu_gib:g} GiB): {error}")
            continue
        return pool, plan
    raise PlanError("no work pool's GPU fits this run:\n  " + "\n  ".join(failures))
