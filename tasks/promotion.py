"""Whether a published run becomes `latest`: the promotion gate's decision. Pure.

The decision is a plain record so a richer gate (several metrics, regressions on a golden set,
a human approval) can replace `score_gate` without touching how the pointer is moved: the
promote step only reads `promote` and stores the whole decision next to the pointer.
"""
from __future__ import annotations

from pydantic import BaseModel


class GateDecision(BaseModel):
    promote: bool
    gate: str  # which gate decided, e.g. "score>=base+min_improvement"
    reason: str  # one sentence a person reads in the logs and in latest.json
    details: dict = {}


def score_gate(metric: str, base_score: float, tuned_score: float, min_improvement: float) -> GateDecision:
    """Promote when the tuned model's task score beats the base's by at least `min_improvement`."""
    needed = base_score + min_improvement
    promote = tuned_score >= needed
    verdict = "promote" if promote else "keep the current latest"
    return GateDecision(
        promote=promote,
        gate="score>=base+min_improvement",
        reason=f"{metric}: tuned {tuned_score:.4f} {'>=' if promote else '<'} base {base_score:.4f} "
               f"+ {min_improvement:.4f}: {verdict}",
        details={"metric": metric, "base_score": base_score, "tuned_score": tuned_score,
                 "min_improvement": min_improvement},
    )
