"""The MLflow registered model's `champion` alias follows `<output>/latest.json`.

When latest.json moves to a run (the flow's promotion, `prefect-finetune promote` or `rollback`), that run
becomes a version of the registered model (once: a run promoted again, or rolled back to, reuses its
version) and the alias moves to it. The version's source is the published run folder when it is on S3,
else the MLflow run's artifacts; either way it is tagged with the run id and where the run is published.
"""
from __future__ import annotations

from typing import Callable

from tasks.store.objects import is_s3_uri
from tasks.tracking.client import TrackingClient
from tasks.tracking.settings import CHAMPION_ALIAS, TrackingSettings


def move_champion(client: TrackingClient, registered_model: str, mlflow_run: str | None,
                  output_uri: str) -> str | None:
    """Point `registered_model`'s alias at the version of `mlflow_run` (registered now if it has none);
    returns the version, or None when MLflow failed (recorded in `client.missed`)."""
    what = f"model version of {registered_model} and its alias {CHAMPION_ALIAS}"
    if mlflow_run is None:
        client.missed.append(f"{what} (the run has no MLflow run)")
        return None
    return client.call(what, lambda c: _register(c, registered_model, mlflow_run, output_uri))


def move_champion_of(manifest: dict, output_uri: str, warn: Callable[[str], None]) -> str | None:
    """`move_champion` for a published run, from what its manifest recorded (the CLI's promote and rollback):
    a message saying where the alias went, or None when the run was not tracked with registration on."""
    recorded = (manifest.get("config") or {}).get("tracking") or {}
    settings = TrackingSettings(**recorded) if recorded else TrackingSettings()
    tracked = (manifest.get("run") or {}).get("tracking") or {}
    if not settings.enabled or not settings.register_model or not tracked:
        return None
    client = TrackingClient(settings, warn)
    version = move_champion(client, settings.model_name, tracked.get("run_id"), output_uri)
    if version is None:
        why = client.error or client.missed[-1]
        return f"MLflow: alias {CHAMPION_ALIAS} of {settings.model_name} not moved ({why})"
    return f"MLflow: {settings.model_name} alias {CHAMPION_ALIAS} -> version {version}"


def _register(client, name: str, mlflow_run: str, output_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Fine-tuned by prefect-finetune; the "
                                       f"'{CHAMPION_ALIAS}' alias is the run that latest.json in the output points at.")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = client.search_model_versions(f"name='{name}' and run_id='{mlflow_run}'")
    if found:
        version = found[0].version
    else:
        source = output_uri if is_s3_uri(output_uri) else f"runs:/{mlflow_run}/"
        version = client.create_model_version(name, source, run_id=mlflow_run, tags={
            "finetune.output_uri": output_uri, "finetune.run_id": output_uri.rstrip("/").rsplit("/", 1)[-1]}).version
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return str(version)
