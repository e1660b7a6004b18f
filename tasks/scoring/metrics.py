"""Task metrics on generated answers, through `evaluate` with the metric modules shipped in
tasks/scoring/metric_modules: `evaluate.load("exact_match")` downloads its script from the Hub and fails
air-gapped, a module loaded by path does not. Every score is in [0, 1], higher is better.

Pure at import: `evaluate` (which pulls in `datasets`) loads only when a metric is computed.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

MODULES = Path(__file__).resolve().parent / "metric_modules"

MetricName = Literal["exact_match", "rouge", "chrf", "bleu", "json_valid"]
ScoreName = Literal["exact_match", "rouge1", "rouge2", "rougeL", "chrf", "bleu", "json_valid", "json_match",
                    "preference_accuracy", "logp_accuracy"]
# Scores of preference runs, computed from held-out pairs' log-probs rather than generated answers
# (tasks/scoring/preference.py); no metric module makes them.
PAIR_SCORES = ("preference_accuracy", "logp_accuracy")

# The scores each module returns: the gate and the headline name a score, the run chooses modules.
SCORES: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "chrf": ("chrf",),
    "bleu": ("bleu",),
    "json_valid": ("json_valid", "json_match"),
}


def module_of(score: str) -> str:
    """The metric module that computes `score`, e.g. 'rougeL' -> 'rouge'."""
    for module, scores in SCORES.items():
        if score in scores:
            return module
    raise ValueError(f"unknown score {score!r}: choose one of {', '.join(s for v in SCORES.values() for s in v)}")


@cache
def load_metric(name: str):
    """The local evaluate module `name`, loaded by path (works offline)."""
    import evaluate

    script = MODULES / name / f"{name}.py"
    if not script.is_file():
        raise ValueError(f"no local metric module {name!r} (looked for {script}); choose one of {', '.join(SCORES)}")
    # In memory: no arrow cache files (and their locks) under ~/.cache shared by concurrent runs.
    return evaluate.load(str(script), keep_in_memory=True)


def compute_metrics(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every score of the chosen metric modules, e.g. {'exact_match': 0.5, 'rouge1': 0.7, ...}."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores: dict[str, float] = {}
    if not references:  # nothing generated: no answer was right (evaluate refuses empty inputs)
        return {key: 0.0 for name in names for key in SCORES[name]}
    for name in dict.fromkeys(names):  # each module once, in the order chosen
        result = load_metric(name).compute(predictions=predictions, references=references)
        scores.update({key: float(result[key]) for key in SCORES[name]})
    return scores
