"""Choose method, micro-batch size and gradient checkpointing from the memory estimate.

The trainer packs a step's rows into micro-batches of at most a token capacity (tasks/engine/packing.py),
so the plan sizes micro-batches in tokens: from the largest step the data can make (its
`batch_size` longest rows, in one pass) down to the longest row (a row is never split), a fourth of
an octave at a time. Memory is planned for a full micro-batch, so any step fits.
Quality first (full > lora > qlora), then speed: checkpointing beats a lower-quality method, and for
a method the plan takes the fastest way that fits. Speed is modelled as a step's cost in tokens:
each micro-batch costs a fixed overhead (kernel launches, which small micro-batches cannot hide
behind GPU work), and each checkpointed layer recomputes its forward pass. So the plan may
checkpoint some of the layers (the fewest that make a micro-batch fit) rather than cut a step into
many small micro-batches. A forced method that cannot fit fails here, before any weights are loaded.
Pure: no torch, no Prefect.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

from pydantic import BaseModel

from tasks.planning.measured import MethodProbe, measured_estimate
from tasks.planning.memory import GIB, FullPrecision, MemoryEstimate, ModelShape, estimate_memory
from tasks.planning.methods import Method, MethodChoice

METHODS_BY_QUALITY = tuple(Method)  # full, lora, qlora: the enum lists them best first
GPU_SAFETY = 0.9  # share of a GPU's memory a plan may use
GPU_SIZES_GIB = (16, 24, 32, 40, 48, 80, 94, 141, 180, 192)  # memory of GPUs sold today, as named
# The speed model, fitted to `benchmarks/capped_speed.py sweep` on an H200 (8B LoRA and QLoRA, chat rows,
# 8.7k-token steps; benchmarks/results/capped_speed_h200_2026-12-01.md): each micro-batch of a step
# costs about 2k tokens of work more (one micro-batch to two: +0.17 to +0.20 s at 9-14k tokens/s), and
# recomputing every layer adds 35-40% (LoRA and QLoRA alike). Full fine-tuning's backward also makes
# weight gradients, so a recomputed forward is a smaller share of its step (a third of 6N, not measured).
MICRO_BATCH_OVERHEAD_TOKENS = 2048
RECOMPUTE_SHARE = {Method.FULL: 0.3, Method.LORA: 0.4, Method.QLORA: 0.4}


class PlanError(ValueError):
    """No configuration fits the memory budget."""


class Candidate(BaseModel):
    estimate: MemoryEstimate
    fits: bool


class TrainingPlan(BaseModel):
    method: Method
    device: str
    tokens_per_micro_batch: int  # packed tokens per forward pass (the trainer's token capacity)
    longest_row: int  # tokens: no micro-batch can be smaller
    micro_batches_per_step: int  # per GPU, in the largest step; typical steps need fewer
    num_gpus: int = 1  # training processes, one per GPU: FSDP2 shards full fine-tuning, DDP for adapters
    gradient_checkpointing: bool
    checkpointed_layers: int | None = None  # with checkpointing, only the first this many layers (None: all)
    budget_bytes: int
    budget_source: str
    estimate: MemoryEstimate
    candidates: list[Candidate]  # the best configuration tried for each method
    reason: str

    def table(self) -> list[dict]:
        return [
            {
                "method": c.estimate.method,
                "tokens_per_micro_batch": c.estimate.tokens,
                "grad_checkpointing": c.estimate.gradient_checkpointing,
                "checkpointed_layers": c.estimate.checkpointed_layers,
                "estimated_gib": round(c.estimate.gib, 2),
                "budget_gib": round(self.budget_bytes / GIB, 2),
                "fits": c.fits,
                "chosen": c.estimate.method == self.method,
                "estimate": c.estimate.kind,  # formula, measured (probe) or conservative (unverified)
            }
            for c in self.candidates
        ]


def select_plan(
    shape: ModelShape,
    *,
    budget_bytes: int,
    budget_source: str,
    device: str,
    method: MethodChoice | str,
    longest_row: int,
    largest_step: int,
    typical_step: int | None = None,
    max_rows_per_micro_batch: int | None = None,
    gradient_checkpointing: str = "auto",
    lora_r: int = 16,
    lora_targets: list[str] | str = "all-linear",
    fused_kernels: bool | None = None,
    num_gpus: int = 1,
    probes: Mapping[Method, MethodProbe] | None = None,
    objective: str = "sft",
    full_precision: Literal["auto", "fp32", "bf16"] = "auto",
) -> TrainingPlan:
    """`longest_row`: tokens of the longest (truncated) row; `largest_step`: tokens of the largest
    optimizer step (the `batch_size` longest rows), which memory is planned for; `typical_step`: the
    tokens of an average step, which speed is planned for (default: the largest);
    `max_rows_per_micro_batch` caps a micro-batch at that many longest rows; `num_gpus`: GPUs the run gets (each its own process: a step's rows
    are split across them, and full fine-tuning is sharded, so it may fit on several but not one);
    `budget_bytes` is per GPU; `probes`: what a probe measured on the GPU for some methods
    (tasks/planning/measured.py), whose estimates then replace the formula's (see select_measured_plan);
    `objective`: sft, dpo or orpo (see estimate_memory); `full_precision`: full fine-tuning's weights, "fp32"
    (master weights), "bf16" (tasks/engine/bf16_adamw.py: half the bytes) or "auto": fp32 where it trains
    without checkpointing, else bf16 where that needs less recomputation (one GPU, formula estimates only)."""
    forced = MethodChoice(method).fixed()
    if full_precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"full_precision must be 'auto', 'fp32' or 'bf16', not {full_precision!r}")
    if full_precision == "bf16" and num_gpus > 1 and forced in (None, Method.FULL):
        raise PlanError(f"full_precision 'bf16' trains full fine-tuning in one process for now, but the run gets "
                        f"{num_gpus} GPUs; set training.num_gpus to 1, or full_precision to 'fp32' or 'auto'")
    per_gpu_step = -(-largest_step // num_gpus)
    usual_step = -(-min(typical_step or largest_step, largest_step) // num_gpus)
    capacities = token_capacities(longest_row, per_gpu_step, max_rows_per_micro_batch)

    def estimate(m: Method, tokens: int, checkpointed: int, precision: FullPrecision = "fp32") -> MemoryEstimate:
        probe = (probes or {}).get(m)
        if probe is not None and precision == "fp32" and (num_gpus == 1 or m.trains_adapter):
            return measured_estimate(probe, tokens, min(checkpointed, probe.layers), num_gpus)
        return estimate_memory(shape, m, device, tokens, checkpointed > 0, lora_r, lora_targets, fused_kernels,
                               num_gpus, checkpointed_layers=checkpointed, objective=objective,
                               full_precision=precision)

    def best_for(m: Method, precision: FullPrecision = "fp32") -> Candidate:
        fitting = [e for tokens in capacities
                   if (e := _leanest_fit(lambda k: estimate(m, tokens, k, precision), shape.num_layers, budget_bytes,
                                         gradient_checkpointing))]
        if not fitting:  # the smallest configuration: what it needs at least
            least = estimate(m, capacities[-1], 0 if gradient_checkpointing == "off" else shape.num_layers, precision)
            return Candidate(estimate=least, fits=False)
        return Candidate(estimate=min(fitting, key=lambda e: _step_cost(e, usual_step, shape.num_layers)), fits=True)

    def best_full() -> Candidate:
        bf16_allowed = device == "cuda" and num_gpus == 1 and Method.FULL not in (probes or {})
        if full_precision == "bf16" or (full_precision == "auto" and not bf16_allowed):
            return best_for(Method.FULL, "bf16" if full_precision == "bf16" else "fp32")
        fp32 = best_for(Method.FULL)
        if full_precision == "fp32" or (fp32.fits and not fp32.estimate.checkpointed_layers):
            return fp32
        bf16 = best_for(Method.FULL, "bf16")  # fp32 would recompute layers, or does not fit
        cost = lambda c: _step_cost(c.estimate, usual_step, shape.num_layers)  # noqa: E731
        return bf16 if bf16.fits and (not fp32.fits or cost(bf16) < cost(fp32)) else fp32

    # Every method is estimated, so the plan's table shows what else would (not) have fitted.
    candidates = [best_full() if m == Method.FULL else best_for(m) for m in METHODS_BY_QUALITY]
    allowed = [c for c in candidates if forced in (None, c.estimate.method)]
    chosen = next((c for c in allowed if c.fits), None)
    budget = f"{budget_bytes / GIB:.2f} GiB ({budget_source})" + (f" on each of {num_gpus} GPUs" if num_gpus > 1 else "")
    if chosen is None:
        if forced:
            needed = allowed[0].estimate
            fitting = [f"{c.estimate.method} ({c.estimate.gib:.2f} GiB)" for c in candidates if c.fits]
            hint = f"use {' or '.join(fitting)}" if fitting else f"use {smallest_gpu(needed.total)}"
            raise PlanError(
                f"method '{forced}' needs at least {needed.gib:.2f} GiB (micro-batches of {longest_row} tokens, "
                f"gradient checkpointing {'on' if needed.gradient_checkpointing else 'off'}) but the budget is "
                f"{budget}; {hint}, lower max_seq_len, or set method to 'auto'"
            )
        smallest = min(candidates, key=lambda c: c.estimate.total)
        raise PlanError(
            f"no method fits: the smallest, {smallest.estimate.method}, needs {smallest.estimate.gib:.2f} GiB "
            f"with micro-batches of {longest_row} tokens (the longest row), but the budget is {budget}; "
            f"use {smallest_gpu(smallest.estimate.total)} or lower max_seq_len"
        )
    est = chosen.estimate
    reason = (
        f"{est.method}: the {'requested' if forced else 'highest-quality'} method that fits "
        f"{budget}; estimated peak {est.gib:.2f} GiB with micro-batches of up to {est.tokens} packed tokens, "
        f"gradient checkpointing {_checkpointing(est, shape.num_layers)}"
        + ("; bf16 weights and AdamW moments, updates rounded stochastically (8 bytes a parameter, not 16)"
           if est.method == Method.FULL and est.full_precision == "bf16" else "")
        + (f"; {num_gpus} GPUs ({'DDP' if est.method.trains_adapter else 'FSDP2, sharded'})" if num_gpus > 1 else "")
        + ("" if est.kind == "formula" else f"; estimate {est.basis}")
    )
    return TrainingPlan(
        method=est.method, device=device, tokens_per_micro_batch=est.tokens, longest_row=longest_row,
        micro_batches_per_step=math.ceil(per_gpu_step / est.tokens), num_gpus=num_gpus,
        gradient_checkpointing=est.gradient_checkpointing,
        checkpointed_layers=est.checkpointed_layers if 0 < est.checkpointed_layers < shape.num_layers else None,
        budget_bytes=budget_bytes,
        budget_source=budget_source, estimate=est, candidates=candidates, reason=reason,
    )


def select_measured_plan(shape: ModelShape, measure: Callable[[Method], MethodProbe | None], **plan_kwargs) -> TrainingPlan:
    """select_plan, with the estimate of a family without a formula measured on this GPU: `measure(method)`
    probes a method (tasks/engine/memory_probe.py; None when it could not). Methods are probed best first,
    each only if its weights and optimizer states alone fit the budget, until a measured one fits;
    the others keep the conservative estimate (the plan table says which is which)."""
    if shape.verified:
        return select_plan(shape, **plan_kwargs)
    forced = MethodChoice(plan_kwargs.get("method", MethodChoice.AUTO)).fixed()
    probes: dict[Method, MethodProbe] = {}
    for method in METHODS_BY_QUALITY:
        sharded = plan_kwargs.get("num_gpus", 1) > 1 and not method.trains_adapter  # one process's probe cannot say
        if forced not in (None, method) or sharded or not _may_fit(shape, method, plan_kwargs):
            continue
        if (probe := measure(method)) is None:
            continue
        probes[method] = probe
        try:
            plan = select_plan(shape, probes=probes, **plan_kwargs)
        except PlanError:
            continue
        if plan.method == method:
            return plan
    return select_plan(shape, probes=probes, **plan_kwargs)


def _may_fit(shape: ModelShape, method: Method, plan_kwargs: dict) -> bool:
    """Whether a method's weights and optimizer states, as the formula counts them, fit the budget:
    if not, no activations make it fit, and probing it would only load a model the GPU cannot train."""
    least = estimate_memory(shape, method, plan_kwargs.get("device", "cuda"), 1, True,
                            plan_kwargs.get("lora_r", 16), plan_kwargs.get("lora_targets", "all-linear"),
                            num_gpus=plan_kwargs.get("num_gpus", 1))
    return least.weights + least.trainable_state <= plan_kwargs["budget_bytes"]


def _leanest_fit(estimate, layers: int, budget_bytes: int, checkpointing: str) -> MemoryEstimate | None:
    """At one micro-batch size: no checkpointing if that fits, else the fewest checkpointed layers that
    fit ('on': all of them; 'off': none), or None. Memory falls as layers are checkpointed, so bisect."""
    if checkpointing != "on" and (plain := estimate(0)).total <= budget_bytes:
        return plain
    if checkpointing == "off" or (everything := estimate(layers)).total > budget_bytes:
        return None
    if checkpointing == "on":
        return everything
    low, high = 1, layers  # estimate(high) fits
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if estimate(middle).total <= budget_bytes else (middle + 1, high)
    return estimate(high)


def _step_cost(est: MemoryEstimate, step_tokens: int, layers: int) -> float:
    """A step's modelled cost in tokens of work (see MICRO_BATCH_OVERHEAD_TOKENS): the lowest is fastest;
    on a tie, the larger micro-batch."""
    micro_batches = math.ceil(step_tokens / est.tokens)
    recomputed = RECOMPUTE_SHARE[est.method] * est.checkpointed_layers / layers
    return micro_batches * MICRO_BATCH_OVERHEAD_TOKENS + step_tokens * (1 + recomputed) - est.tokens * 1e-6


def _checkpointing(est: MemoryEstimate, layers: int) -> str:
    if not est.checkpointed_layers:
        return "off"
    return "on" if est.checkpointed_layers == layers else f"on for {est.checkpointed_layers} of {layers} layers"


def smallest_gpu(needed_bytes: int) -> str:
    """'a GPU of at least N GiB (...)': the smallest common size whose planned share holds `needed_bytes`."""
    fitting = [g for g in GPU_SIZES_GIB if g * GPU_SAFETY * GIB >= needed_bytes]
    at_least = needed_bytes / GIB / GPU_SAFETY
    if not fitting:
        return f"more than one GPU: it needs {at_least:.0f} GiB, more than any single GPU has"
    return f"a GPU of at least {at_least:.0f} GiB (the smallest common size that fits: {fitting[0]} GiB)"


class Attempt(BaseModel):
    """One way of running the training: what an out-of-memory error makes the train task change."""
    method: Method
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    checkpointed_layers: int | None = None  # with checkpointing: the first this many layers (None: all)
    full_precision: FullPrecision = "fp32"  # full fine-tuning's weights (tasks/planning/memory.py); adapters: fp32

    @property
    def checkpointing(self) -> str:
        """In words, for logs and errors: off, on, or on for the first k layers."""
        if not self.gradient_checkpointing:
            return "off"
        return "on" if self.checkpointed_layers is None else f"on for the first {self.checkpointed_layers} layers"


def step_down(attempt: Attempt, *, planned_tokens: int, longest_row: int, method_fixed: bool,
              bf16_allowed: bool = False) -> Attempt | None:
    """The next, leaner way to train after `attempt` ran out of memory, or None when none is left.

    In order: halve the micro-batch (more of them per step: the same update), down to the longest
    row; then gradient checkpointing of every layer, from the planned micro-batch again; then, for
    full fine-tuning with fp32 master weights where `bf16_allowed` (full_precision auto, one GPU), bf16
    weights; then LoRA, then QLoRA (unless the config forces its method), each again from the planned
    micro-batch.
    """
    if attempt.tokens_per_micro_batch // 2 >= longest_row:
        return attempt.model_copy(update={"tokens_per_micro_batch": attempt.tokens_per_micro_batch // 2})
    if not attempt.gradient_checkpointing or attempt.checkpointed_layers is not None:
        return attempt.model_copy(update={"tokens_per_micro_batch": planned_tokens, "gradient_checkpointing": True,
                                          "checkpointed_layers": None})
    if attempt.method == Method.FULL and attempt.full_precision == "fp32" and bf16_allowed:
        return attempt.model_copy(update={"tokens_per_micro_batch": planned_tokens, "full_precision": "bf16"})
    leaner = METHODS_BY_QUALITY.index(attempt.method) + 1
    if method_fixed or leaner == len(METHODS_BY_QUALITY):
        return None
    return Attempt(method=METHODS_BY_QUALITY[leaner], tokens_per_micro_batch=planned_tokens,
                   gradient_checkpointing=True)


def step_tokens(lengths: list[int], batch_size: int) -> tuple[int, int]:
    """(largest, typical) tokens of an optimizer step over rows of these token `lengths`: the
    `batch_size` longest rows, which memory is planned for; and `batch_size` rows of the mean length,
    which speed is planned for."""
    rows = min(batch_size, len(lengths))
    largest = sum(sorted(lengths)[-rows:]) if rows else 0
    return largest, round(sum(lengths) / max(len(lengths), 1) * rows)


def token_capacities(longest_row: int, largest_step: int, max_rows: int | None = None) -> list[int]:
    """Micro-batch sizes to try, in tokens, largest first: the whole step, then smaller by a fourth of
    an octave (x0.84) each, down to the longest row (packing never splits a row, so no micro-batch can
    be smaller). Fine steps let a usual step, smaller than the largest, go in one micro-batch where
    a halving would leave it two."""
    top = max(longest_row, largest_step if max_rows is None else min(largest_step, max_rows * longest_row))
    sizes = [top]
    while (smaller := int(top * 2 ** (-len(sizes) / 4))) > longest_row:
        sizes.append(smaller)
    if sizes[-1] != longest_row:
        sizes.append(longest_row)
    return sizes


class WorkPoolSpec(BaseModel):
    """A Prefect work pool whose workers have GPUs of one size."""

    name: str
    gpu_gib: float  # memory of one GPU, as sold (e.g. 24, 80, 141)
    gpus: int = 1  # GPUs per machine (a run uses one machine's)


def select_work_pool(shape: ModelShape, pools: list[WorkPoolSpec], *, safety: float = GPU_SAFETY,
                     **plan_kwargs) -> tuple[WorkPoolSpec, TrainingPlan]:
    """The smallest pool whose GPU fits a plan, and that plan (`plan_kwargs` as for select_plan).

    Pools are tried from the least memory per machine up, each with `safety` of its GPUs' memory as
    the budget, so a job that fits a 24 GiB card does not hold an 80 GiB one. Raises PlanError naming what each pool lacks.
    """
    if not pools:
        raise PlanError("no work pools given: list at least one pool with its GPU memory (name, gpu_gib)")
    failures = []
    for pool in sorted(pools, key=lambda p: (p.gpu_gib * p.gpus, p.gpu_gib)):
        try:
            plan = select_plan(shape, budget_bytes=int(pool.gpu_gib * safety * GIB),
                               budget_source=f"{safety:.0%} of a {pool.gpu_gib:g} GiB GPU in work pool {pool.name!r}",
                               device="cuda", num_gpus=pool.gpus, **plan_kwargs)
        except PlanError as error:
            failures.append(f"{pool.name} ({pool.gpu_gib:g} GiB): {error}")
            continue
        return pool, plan
    raise PlanError("no work pool's GPU fits this run:\n  " + "\n  ".join(failures))
