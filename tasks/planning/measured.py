"""A memory estimate measured on the GPU, for a model family the estimator has no formula for (issue 16).

tasks/engine/memory_probe.py loads the model as the method trains it and runs the trainer's forward
and backward on random packed rows at two token counts, once with no layer checkpointed and once with
every layer checkpointed, reading the allocator's peak each time. A step's memory is linear in its
tokens (varlen attention keeps per-token state), so two points make a line: the bytes a step needs
whatever its size (gradients, autocast's weight copies, the loss's working chunk) and the bytes per
token (activations). Here those lines become an estimate for any micro-batch size and any number
of checkpointed layers, in place of the conservative formula. Two terms that are not linear keep the
formula's form: eager attention's score matrices (the square of the micro-batch) and the fused loss's
chunk (bounded). Not modelled: the boolean block-diagonal mask of the SDPA fallback (a family with
sliding windows on a PyTorch whose varlen attention takes none), one byte per token squared.
Pure: no torch, no Prefect.
"""
from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel, Field, model_validator

from tasks.planning.memory import MemoryEstimate, overhead_bytes
from tasks.planning.methods import Method

# The two micro-batch sizes a probe measures. Rows longer than the smaller are cut to it: with varlen
# attention a token keeps the same whatever its row's length, and eager attention's square term is the
# micro-batch's (see square_bytes_per_layer), so short rows measure what long ones would, in seconds.
PROBE_TOKENS = (1024, 2048)


class ProbePoint(BaseModel):
    tokens: int = Field(gt=0)  # packed tokens of the micro-batch
    step_bytes: int = Field(ge=0)  # peak allocated in forward + backward, above what the loaded model holds


class Line(NamedTuple):
    fixed: float  # bytes, whatever the tokens
    per_token: float


class MethodProbe(BaseModel):
    """What a probe measured for one method on one GPU."""
    method: Method
    gpu: str
    layers: int = Field(gt=0)  # decoder layers (what checkpointing covers)
    weights_bytes: int = Field(ge=0)  # allocated by loading the model as the method trains it
    optimizer_bytes: int = Field(ge=0)  # AdamW's two moments of every trainable parameter (made at the first step)
    checkpoint_input_bytes: int = Field(ge=0)  # per token: what a checkpointed layer keeps (its input)
    # Eager attention (soft-capped logits) keeps a tokens x tokens score matrix per head: bytes per
    # token squared of one plain layer, from the formula (memory.eager_attention_bytes); 0 for varlen attention.
    square_bytes_per_layer: int = 0
    # The fused loss (tasks/engine/loss.py) works on a chunk of at most `loss_chunk_tokens` tokens' logits:
    # bytes per token up to that many, then none more (a line through two smaller sizes would extrapolate it).
    loss_chunk_tokens: int = 0
    loss_chunk_bytes_per_token: int = 0
    plain: list[ProbePoint]  # no layer checkpointed
    checkpointed: list[ProbePoint]  # every layer checkpointed
    fused_kernels: bool = False
    attention: str = ""
    seconds: float = 0.0

    @model_validator(mode="after")
    def _two_token_counts(self):
        for name in ("plain", "checkpointed"):
            if len({p.tokens for p in getattr(self, name)}) < 2:
                raise ValueError(f"{name}: a probe needs points at two different token counts to fit a line, "
                                 f"got {[p.tokens for p in getattr(self, name)]}")
        return self

    def line(self, checkpointed: bool) -> Line:
        """The fitted line of the plain or the all-checkpointed runs, the terms known in form taken out."""
        scored = 2 if checkpointed else self.layers  # as memory.estimate_memory counts them
        points = self.checkpointed if checkpointed else self.plain
        return fit_line([(p.tokens, p.step_bytes - self._known_bytes(p.tokens, scored)) for p in points])

    def _known_bytes(self, tokens: int, scored_layers: int) -> int:
        """What the line leaves out, known in form: eager attention's square term and the loss's chunk."""
        return (self.square_bytes_per_layer * scored_layers * tokens ** 2
                + self.loss_chunk_bytes_per_token * min(tokens, self.loss_chunk_tokens))

    def step_bytes(self, tokens: int, checkpointed: int) -> int:
        """Peak bytes of forward + backward over `tokens` packed tokens with the first `checkpointed`
        layers recomputed, above the loaded model."""
        plain, everything = self.line(False), self.line(True)
        fixed, per_token = checkpointed_line(plain, everything, self.layers, checkpointed, self.checkpoint_input_bytes)
        scored = self.layers - checkpointed + (2 if checkpointed else 0)
        return round(fixed + per_token * tokens + self._known_bytes(tokens, scored))

    def describe(self) -> str:
        plain, everything = self.line(False), self.line(True)
        return (f"measured (probe) on {self.gpu}: {plain.per_token / 1024:.1f} KiB per token with no layer "
                f"checkpointed, {everything.per_token / 1024:.1f} KiB with all {self.layers}; loaded model "
                f"{self.weights_bytes / 2**30:.2f} GiB (points at {sorted({p.tokens for p in self.plain})} tokens, "
                f"{self.seconds:.0f} s)")


def fit_line(points: list[tuple[int, float]]) -> Line:
    """The least-squares line through (tokens, bytes) points, raised to pass through or above every
    one (a plan may not fall below a measurement); bytes per token are never negative."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if len(set(xs)) < 2:
        raise ValueError(f"a line needs points at two different token counts, got {xs}")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    slope = max(slope, 0.0)
    return Line(fixed=max(0.0, max(y - slope * x for x, y in points)), per_token=slope)


def checkpointed_line(plain: Line, everything: Line, layers: int, checkpointed: int, checkpoint_input: int) -> Line:
    """The line for the first `checkpointed` of `layers` layers recomputed, from the two measured ends.

    Per token, a plain step keeps layers x p + c (p: one layer's activations; c: what no layer holds,
    the loss's and the gradients in flight); with every layer checkpointed, layers x q + p + c (q: a
    checkpointed layer's input, `checkpoint_input`; plus the one layer being recomputed). The two give
    p and c; k checkpointed layers keep (layers - k) x p + k x q + p + c. The fixed bytes (autocast's
    copies of the weights of the layers that run plainly, and of the recomputed one) go linearly between the two ends.
    """
    if checkpointed <= 0:
        return plain
    if checkpointed >= layers or layers == 1:
        return everything
    per_layer = (plain.per_token - everything.per_token + layers * checkpoint_input) / (layers - 1)
    rest = plain.per_token - layers * per_layer
    per_token = max((layers - checkpointed) * per_layer + checkpointed * checkpoint_input + per_layer + rest,
                    everything.per_token)  # never less than recomputing every layer
    fixed = everything.fixed + (plain.fixed - everything.fixed) * (layers - checkpointed) / (layers - 1)
    return Line(fixed=fixed, per_token=per_token)


def measured_estimate(probe: MethodProbe, tokens: int, checkpointed: int, num_gpus: int = 1) -> MemoryEstimate:
    """The plan's estimate from a probe: the loaded model, AdamW's moments and the measured step, plus the
    runtime and the allocator's slack as the formula counts them (memory.overhead_bytes). With several GPUs,
    adapters run data-parallel: each holds the whole base, and the all-reduce a second copy of the
    adapters' gradients (full fine-tuning is sharded: the probe of one process does not describe it)."""
    if num_gpus > 1 and not probe.method.trains_adapter:
        raise ValueError("a probe measures one process; sharded full fine-tuning (FSDP2) keeps the formula's estimate")
    trainable = probe.optimizer_bytes + (probe.optimizer_bytes // 2 if num_gpus > 1 else 0)
    activations = probe.step_bytes(tokens, checkpointed)
    return MemoryEstimate(
        method=probe.method, device="cuda", tokens=tokens, gradient_checkpointing=checkpointed > 0,
        checkpointed_layers=checkpointed, fused_kernels=probe.fused_kernels, weights=probe.weights_bytes,
        trainable_state=trainable, activations=activations, logits=0,  # the loss is in the measured step
        overhead=overhead_bytes("cuda", probe.method, checkpointed, probe.weights_bytes + trainable + activations),
        verified=True, measured=True, basis=probe.describe(),
    )
