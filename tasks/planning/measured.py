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

from itertools import pairwise
from typing import NamedTuple

from pydantic import BaseModel, Field, model_validator

from tasks.planning.memory import MemoryEstimate, overhead_bytes
from tasks.planning.methods import Method

# The two micro-batch sizes a probe measures. Rows longer than the smaller are cut to it: with varlen
# attention a token keeps the same whatever its row's length, and eager attention's square term is the
# micro-batch's (see square_bytes_per_layer), so short rows measure what long ones would, in seconds.
PROBE_TOKENS = (1024, 2048)
# With every layer checkpointed a step keeps little per token, and its peak is the larger of two: while
# the loss runs (the checkpointed inputs and the loss's fixed-size chunk of logits) and while backward
# recomputes a layer (the inputs, that layer's activations and the gradients in flight: more per token,
# no chunk). At PROBE_TOKENS the first is the larger, so a line through them misses the second's bytes
# per token (H200, Llama 1B QLoRA: 88 KiB per token at 1-2k tokens, 170-190 between 8k and 32k; 23%
# under at 32k). So the probe measures the second apart (MethodProbe.recomputed: one trained token a row,
# so the loss's chunk is a few rows), and the checkpointed runs also at 8 and 16 times PROBE_TOKENS
# (about the memory of the plain runs): the estimate is the largest of their lines (step_bytes).
CHECKPOINTED_PROBE_TOKENS = (*PROBE_TOKENS, 8 * PROBE_TOKENS[0], 8 * PROBE_TOKENS[1])


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
    # every layer checkpointed, one trained token a row: the peak while backward recomputes a layer
    recomputed: list[ProbePoint] = []
    fused_kernels: bool = False
    attention: str = ""
    seconds: float = 0.0

    @model_validator(mode="after")
    def _two_token_counts(self):
        for name in ("plain", "checkpointed", "recomputed"):
            counts = {p.tokens for p in getattr(self, name)}
            if len(counts) < 2 and (counts or name != "recomputed"):  # none recomputed: a probe from before them
                raise ValueError(f"{name}: a probe needs points at two different token counts to fit a line, "
                                 f"got {[p.tokens for p in getattr(self, name)]}")
        return self

    def lines(self, checkpointed: bool, chunk: bool = True) -> list[Line]:
        """The plain, the all-checkpointed or (`chunk` False) the recomputed runs, the terms known in form
        taken out: a line through each two neighbouring token counts. A step's peak is the larger of
        lines (the moment of the peak changes with the size, see CHECKPOINTED_PROBE_TOKENS)."""
        scored = 2 if checkpointed else self.layers  # as memory.estimate_memory counts them
        measured = (self.checkpointed if chunk else self.recomputed) if checkpointed else self.plain
        points = [(p.tokens, p.step_bytes - self._known_bytes(p.tokens, scored, chunk)) for p in measured]
        counts = sorted({tokens for tokens, _ in points})
        return [fit_line([(t, y) for t, y in points if t in pair]) for pair in pairwise(counts)]

    def _known_bytes(self, tokens: int, scored_layers: int, chunk: bool = True) -> int:
        """What the line leaves out, known in form: eager attention's square term and the loss's chunk
        (which the recomputed runs do not hold: the loss has long finished when a layer is recomputed)."""
        return (self.square_bytes_per_layer * scored_layers * tokens ** 2
                + (self.loss_chunk_bytes_per_token * min(tokens, self.loss_chunk_tokens) if chunk else 0))

    def step_bytes(self, tokens: int, checkpointed: int) -> int:
        """Peak bytes of forward + backward over `tokens` packed tokens with the first `checkpointed`
        layers recomputed, above the loaded model: the largest of the lines, while the loss runs and
        while a layer is recomputed."""
        scored = self.layers - checkpointed + (2 if checkpointed else 0)
        peaks = [fixed + per_token * tokens + self._known_bytes(tokens, scored, chunk)
                 for chunk in (True, False) for plain in self.lines(False) for everything in self.lines(True, chunk)
                 for fixed, per_token in [checkpointed_line(plain, everything, self.layers, checkpointed,
                                                            self.checkpoint_input_bytes)]]
        return round(max(0.0, *peaks))

    def describe(self) -> str:
        plain = self.lines(False)[-1]  # the largest sizes'
        everything = max(self.lines(True) + self.lines(True, chunk=False), key=lambda line: line.per_token)
        return (f"measured (probe) on {self.gpu}: {plain.per_token / 1024:.1f} KiB per token with no layer "
                f"checkpointed, {everything.per_token / 1024:.1f} KiB with all {self.layers}; loaded model "
                f"{self.weights_bytes / 2**30:.2f} GiB (points at {sorted({p.tokens for p in self.plain})} tokens, "
                f"checkpointed {sorted({p.tokens for p in self.checkpointed})}, recomputed "
                f"{sorted({p.tokens for p in self.recomputed})}, "
                f"{self.seconds:.0f} s)")


def fit_line(points: list[tuple[int, float]]) -> Line:
    """The least-squares line through (tokens, bytes) points, raised to pass through or above every
    one (a plan may not fall below a measurement); bytes per token are never negative. Its fixed bytes
    may be: a line of a peak that is the larger of two (MethodProbe.lines) starts below zero."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if len(set(xs)) < 2:
        raise ValueError(f"a line needs points at two different token counts, got {xs}")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    slope = max(slope, 0.0)
    return Line(fixed=max(y - slope * x for x, y in points), per_token=slope)


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
