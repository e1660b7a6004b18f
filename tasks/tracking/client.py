"""MLflow's client behind a breaker, so tracking never fails or stalls a run.

Every request gets `request_timeout_s` and no retries; the first call that fails (server down, refused,
slow, mlflow not installed) warns once and switches tracking off for the rest of the process's run: every
later call is skipped at once. Each failed or skipped call is recorded by name in `missed`, for the run's
`mlflow-tracking` artifact. mlflow is imported on the first call, never when tracking is off.
"""
from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

from tasks.tracking.settings import TrackingSettings

T = TypeVar("T")
INSTALL_HINT = "mlflow is not installed: pip install 'prefect-finetune[mlflow]' on the worker"


class TrackingClient:
    def __init__(self, settings: TrackingSettings, warn: Callable[[str], None]):
        self.settings, self._warn = settings, warn
        self.missed: list[str] = []
        self.error: str | None = None  # the first failure; set: tracking is off
        self.seconds = 0.0  # spent in calls: what tracking cost the run
        self._client = None

    def call(self, what: str, request: Callable[[object], T]) -> T | None:
        """`request(MlflowClient)`; None when it failed or tracking is already off (recorded as `what`)."""
        if self.error is not None:
            self.missed.append(what)
            return None
        started = time.perf_counter()
        try:
            return request(self._client or self._connect())
        except Exception as error:  # tracking must not fail the run, whatever MLflow raises
            self.error = _describe(error)
            self.missed.append(what)
            self._warn(f"MLflow tracking at {self.settings.uri} failed ({self.error}) while logging {what}; "
                       "tracking is off for the rest of this run and the run goes on. What was not logged is "
                       "listed in the `mlflow-tracking` artifact.")
            return None
        finally:
            self.seconds += time.perf_counter() - started

    def _connect(self):
        try:
            from mlflow import MlflowClient
        except ImportError as error:
            raise RuntimeError(INSTALL_HINT) from error
        # mlflow reads these for every request; its defaults (120 s, 7 retries with backoff) would let a
        # dead server hold a run for minutes. Process-wide: the flow's process is the run's own.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.settings.request_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        self._client = MlflowClient(tracking_uri=self.settings.uri, registry_uri=self.settings.uri)
        return self._client


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}".rstrip(": ")
