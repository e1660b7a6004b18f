"""Whether a published run becomes `latest`: the promotion gate's decision. Pure.

The gate is a list of checks, every one of which must pass: the tuned model beats the base by at
least `min_improvement` on the run's metric; when a model is already published, it does not fall
more than `max_regression` below it on the same rows; optionally its eval loss is not more than
`max_eval_loss_increase` above the base's. The decision is a plain record: the promote step only
reads `promote` and stores the whole decision next to the pointer (and in the manifest).
"""
from __future__ import annotations

import math

from pydantic import BaseModel


class GateDecision(BaseModel):
    promote: bool
    gate: str  # which checks decided, e.g. "score>=base+min_improvement, score>=published-max_regression"
    reason: str  # one sentence a person reads in the logs and in latest.json
    details: dict = {}


class GateCheck(BaseModel):
    name: str
    passed: bool
    detail: str  # the numbers compared, e.g. "exact_match: tuned 0.8125 >= base 0.0000 + 0.5000"


class ModelScores(BaseModel):
    """What the gate reads of one evaluated model (tasks/evaluate.EvalResult has more)."""
    score: float
    loss: float


def _at_least(name: str, label: str, value: float, other: str, bound: float, offset: str) -> GateCheck:
    passed = value >= bound
    return GateCheck(name=name, passed=passed,
                     detail=f"{label} {value:.4f} {'>=' if passed else '<'} {other} {offset} = {bound:.4f}")


def gate_checks(metric: str, base: ModelScores, tuned: ModelScores, published: ModelScores | None,
                min_improvement: float, max_regression: float | None,
                max_eval_loss_increase: float | None) -> list[GateCheck]:
    checks = [_at_least("score>=base+min_improvement", f"{metric}: tuned", tuned.score, "base",
                        base.score + min_improvement, f"{base.score:.4f} + {min_improvement:.4f}")]
    if max_regression is not None and published is not None:
        checks.append(_at_least("score>=published-max_regression", f"{metric}: tuned", tuned.score, "published",
                                published.score - max_regression, f"{published.score:.4f} - {max_regression:.4f}"))
    if max_eval_loss_increase is not None:
        limit = base.loss + max_eval_loss_increase
        passed = tuned.loss <= limit  # NaN compares False: a diverged model never passes
        checks.append(GateCheck(name="eval_loss<=base+max_eval_loss_increase", passed=passed,
                                detail=f"eval loss: tuned {tuned.loss:.4f} {'<=' if passed else '>'} base "
                                       f"{base.loss:.4f} + {max_eval_loss_increase:.4f} = {limit:.4f}"))
    return checks


def promotion_gate(metric: str, base: ModelScores, tuned: ModelScores, published: ModelScores | None = None,
                   min_improvement: float = 0.0, max_regression: float | None = None,
                   max_eval_loss_increase: float | None = None) -> GateDecision:
    """Promote only when every check passes; the reason names each check and its numbers."""
    checks = gate_checks(metric, base, tuned, published, min_improvement, max_regression, max_eval_loss_increase)
    promote = all(c.passed for c in checks)
    failed = [c for c in checks if not c.passed]
    verdict = "promote" if promote else "keep the current latest"
    shown = checks if promote else failed  # a blocked run says what blocked it
    return GateDecision(
        promote=promote,
        gate=", ".join(c.name for c in checks),
        reason="; ".join(c.detail for c in shown) + f": {verdict}",
        details={"metric": metric, "base_score": base.score, "tuned_score": tuned.score,
                 "published_score": published.score if published else None,
                 "min_improvement": min_improvement, "max_regression": max_regression,
                 "max_eval_loss_increase": max_eval_loss_increase,
                 "checks": [c.model_dump() for c in checks]},
    )


def score_gate(metric: str, base_score: float, tuned_score: float, min_improvement: float) -> GateDecision:
    """The score check alone (no loss, no published model): what callers that only have scores use."""
    return promotion_gate(metric, ModelScores(score=base_score, loss=math.nan),
                          ModelScores(score=tuned_score, loss=math.nan), min_improvement=min_improvement)
