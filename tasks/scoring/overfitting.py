"""Overfitting: train loss still falling while eval loss climbs away from its best. Pure.

Read from the training history (one record per step, `eval_loss` on evaluation steps), by the
trainer as it goes (a warning in the log) and by the report afterwards.
"""
from __future__ import annotations

import math

EVAL_RISE_TOLERANCE = 0.10  # eval loss this far (relative) above its best before we call it divergence


def _mean_train_loss(history: list[dict], after_step: int, up_to_step: int) -> float:
    losses = [r["train_loss"] for r in history if after_step < r["step"] <= up_to_step]
    return sum(losses) / len(losses) if losses else math.nan


def overfitting_warning(history: list[dict], tolerance: float = EVAL_RISE_TOLERANCE) -> str | None:
    """A sentence when the latest eval loss is > best * (1 + tolerance) while the train loss over
    the latest eval interval is below that over the best one's; else None."""
    evals = [(r["step"], r["eval_loss"]) for r in history if math.isfinite(r.get("eval_loss", math.nan))]
    if len(evals) < 2:
        return None
    steps = [0] + [step for step, _ in evals]
    best_index = min(range(len(evals)), key=lambda i: evals[i][1])
    (best_step, best), (last_step, last) = evals[best_index], evals[-1]
    if best_index == len(evals) - 1 or last <= best * (1 + tolerance):
        return None
    train_at_best = _mean_train_loss(history, steps[best_index], best_step)
    train_now = _mean_train_loss(history, steps[-2], last_step)
    if not train_now < train_at_best:
        return None  # both losses rose: unstable training, not overfitting
    return (f"possible overfitting: eval loss rose from {best:.4f} (step {best_step}) to {last:.4f} "
            f"(step {last_step}, +{(last / best - 1):.0%}) while train loss fell from {train_at_best:.4f} to "
            f"{train_now:.4f}; the best checkpoint (step {best_step}) is kept. Fewer steps, a lower "
            f"learning rate or more data would help.")
