"""The `tracking` section of the run's config: where MLflow is, and what to register. Pure (pydantic only)."""
from __future__ import annotations

from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CHAMPION_ALIAS = "champion"  # the registered model's alias that follows <output>/latest.json


class TrackingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown keys are typos: rejected
    uri: str | None = Field(
        None, description="MLflow tracking server, e.g. http://mlflow:5000 (needs `pip install "
        "prefect-finetune[mlflow]`). Empty: no tracking. A server that is down never fails the run: it is "
        "noted once, and what could not be logged is listed in the run's `mlflow-tracking` artifact.",
    )
    experiment: str = Field("prefect-finetune", min_length=1, description="MLflow experiment the runs go to "
                            "(created when missing).")
    register_model: bool = Field(
        True, description="Register each promoted run as a new version of `registered_model` and move its "
        f"alias '{CHAMPION_ALIAS}' with latest.json (promote and rollback move it too).",
    )
    registered_model: str | None = Field(
        None, min_length=1, description="Registered model name; empty: the experiment's name.",
    )
    request_timeout_s: int = Field(
        5, ge=1, le=120, description="Seconds one MLflow request may take. Tracking gives up for the rest of the "
        "run after the first failed request (no retries), so a dead server costs at most this once.",
    )

    @field_validator("uri")
    @classmethod
    def _blank_is_off(cls, uri: str | None) -> str | None:
        return uri.strip() or None if uri is not None else None  # the UI form sends "" for an emptied field

    @model_validator(mode="after")
    def _check_uri(self) -> TrackingSettings:
        if self.uri is not None:
            parsed = urlparse(self.uri)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"tracking.uri={self.uri!r} is not an MLflow server URL: give http(s)://host:port "
                                 "(the `mlflow server` address), or leave it empty to switch tracking off")
        return self

    @property
    def enabled(self) -> bool:
        return self.uri is not None

    @property
    def model_name(self) -> str:
        return self.registered_model or self.experiment
