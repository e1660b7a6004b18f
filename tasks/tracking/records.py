"""What a run logs to MLflow, as plain values built from the config and the manifest. Pure: no mlflow, so the
shapes are tested without a server, and the flow builds them only when tracking is on."""
from __future__ import annotations

import json

PARAM_VALUE_LIMIT = 6000  # MLflow's longest param value
HISTORY_METRICS = {"train_loss": "train/loss", "lr": "train/learning_rate", "tokens_per_s": "train/tokens_per_s",
                   "answer_tokens_per_s": "train/answer_tokens_per_s", "eval_loss": "eval/loss"}


def flat_params(record: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: `training.learning_rate` -> "0.003"; lists and nulls as JSON."""
    params = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            params[name] = text[:PARAM_VALUE_LIMIT]
    return params


def step_metrics(history: list[dict]) -> list[tuple[str, float, int]]:
    """(key, value, step) for every training step: train loss, learning rate, tokens/s; eval loss where evaluated."""
    return [(key, float(row[field]), int(row["step"])) for row in history
            for field, key in HISTORY_METRICS.items() if row.get(field) is not None]


def score_metrics(evaluation: dict) -> dict[str, float]:
    """base/tuned/published: every score, the eval loss and perplexity (`tuned/exact_match`, `base/eval_loss`)."""
    metrics = {}
    for label in ("base", "tuned", "published"):
        result = evaluation.get(label)
        if result:
            metrics.update({f"{label}/{name}": value for name, value in result["scores"].items()})
            metrics.update({f"{label}/eval_loss": result["loss"], f"{label}/perplexity": result["perplexity"]})
    return metrics


def plan_record(manifest: dict) -> tuple[dict[str, str], dict[str, float]]:
    """The plan as params (method, micro-batch, checkpointing, device) and its memory as metrics: the estimate
    next to the peak measured while training."""
    plan, training, memory = manifest["plan"], manifest["training"], manifest["memory"]
    params = flat_params({key: plan.get(key) for key in ("method", "reason", "device", "tokens_per_micro_batch",
                                                          "gradient_checkpointing", "num_gpus")}, "plan.")
    metrics = {"plan/estimated_peak_bytes": memory.get("estimated_bytes"),
               "plan/measured_peak_bytes": memory.get("measured_bytes"),
               "plan/measured_over_estimated": memory.get("measured_over_estimated"),
               "train/steps": training.get("steps"), "train/seconds": training.get("seconds"),
               "train/best_step": training.get("best_step")}
    return params, {key: float(value) for key, value in metrics.items() if value is not None}


def quarantine_counts(data: dict) -> dict:
    """Per data source: rows read, kept and quarantined, and how many broke each rule."""
    return {"sources": [{"uri": s["uri"], "read": s.get("read"), "kept": s.get("rows"),
                         "quarantined": s.get("quarantined", 0), "rules": s.get("problems", {})}
                        for s in data.get("sources", [])],
            "quarantined": sum(s.get("quarantined", 0) for s in data.get("sources", []))}
