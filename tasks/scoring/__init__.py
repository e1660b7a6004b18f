"""Scoring: metrics (the local evaluate modules in metric_modules/), the evaluation settings, the
promotion gate and the overfitting check. Never the top of tasks/, the engine, Prefect or torch."""
