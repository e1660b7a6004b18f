"""Experiment tracking in MLflow (the optional `mlflow` extra): settings, what is logged, and a client that
never fails or stalls a run. Only `client.py` and `champion.py` import mlflow, and only when tracking is on."""
