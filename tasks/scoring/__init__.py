"""Scoring: metrics (the local evaluate modules in metric_modules/), the promotion gate and the
overfitting check. Pure: never Prefect or torch."""
