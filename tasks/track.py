"""MLflow tracking of a flow run (config `tracking`; off by default, the `mlflow` extra when on).

One MLflow run per flow run, tagged with the Prefect flow run's id and URL, with a Prefect link artifact
pointing back at it. `start_tracking` opens it and logs the config as params; `track_results` logs, from
the manifest once the run is published, the per-step training metrics (with their step numbers), the
scores, the plan and the artifacts, registers a promoted run as a new model version and moves the `champion`
alias to it (tasks/tracking/champion.py), then closes the run. Training itself makes no MLflow call: its
per-step history comes back in the TrainResult.

Nothing here fails the run: MLflow errors are caught by the client's breaker (tasks/tracking/client.py),
warned once, and what was not logged is listed in the `mlflow-tracking` markdown artifact and the flow's
result. These are plain functions, not tasks, so a run without tracking pays nothing for them.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tasks.config import FinetuneConfig
from tasks.reports.loss_curve import LOSS_CURVE_NAME
from tasks.reports.summary import summary_markdown
from tasks.results import RunInfo, TrackedRun, TrackingReport
from tasks.store.objects import MANIFEST_NAME, join_uri, read_object
from tasks.tracking.champion import move_champion
from tasks.tracking.client import TrackingClient
from tasks.tracking.records import flat_params, plan_record, quarantine_counts, score_metrics, step_metrics

PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000  # MLflow's log_batch limits
_OPEN: dict[str, tuple[TrackingClient, TrackedRun]] = {}  # flow run -> its client and MLflow run, while it runs


def _key(run: RunInfo) -> str:
    return run.flow_run_id or run.run_id


def start_tracking(config: FinetuneConfig, run: RunInfo) -> RunInfo:
    """Open the MLflow run and log the config as given; returns `run` with its `tracking` set (unchanged when
    tracking is off)."""
    settings = config.tracking
    if not settings.enabled:
        return run
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    client = TrackingClient(settings, get_run_logger().warning)
    flow_run_url = flow_run.ui_url
    tags = {"prefect.flow_run_id": str(run.flow_run_id or ""), "prefect.flow_run_url": flow_run_url or "",
            "finetune.run_id": run.run_id, "finetune.output_uri": run.output_uri,
            "mlflow.note.content": f"Prefect flow run [{run.flow_run_id}]({flow_run_url}), published to "
                                   f"`{run.output_uri}`."}
    experiment_id = client.call(f"experiment {settings.experiment!r}", lambda c: _experiment(c, settings.experiment))
    created = experiment_id and client.call("the MLflow run", lambda c: c.create_run(
        experiment_id, start_time=int(time.time() * 1000), tags=tags, run_name=run.run_id))
    tracked = TrackedRun(uri=settings.uri, experiment_id=experiment_id or None,
                         run_id=created.info.run_id if created else None)
    _OPEN[_key(run)] = (client, tracked)
    if created:
        tracked.url = f"{settings.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{tracked.run_id}"
        params = flat_params(config.model_dump(mode="json"))
        client.call(f"params ({len(params)})", lambda c: _log_params(c, tracked.run_id, params))
        _link_artifact(tracked, run)
    else:
        client.missed.append("params (the config)")
    return run.model_copy(update={"tracking": tracked})


def track_results(config: FinetuneConfig, run: RunInfo, manifest: dict, promoted: bool) -> TrackingReport | None:
    """Log what the run produced, register it when promoted, and close the MLflow run (None: tracking off)."""
    client, tracked = _OPEN.pop(_key(run), (None, None))
    if client is None:
        return None
    if tracked.run_id:
        _log_results(client, tracked.run_id, config, run, manifest, promoted)
        if promoted and config.tracking.register_model:  # latest.json moved to this run: so does the alias
            tracked.model_version = move_champion(client, config.tracking.model_name, tracked.run_id, run.output_uri)
        client.call("the run's end", lambda c: c.set_terminated(tracked.run_id, "FINISHED"))
    else:
        client.missed += ["metrics", "plan", "scores", "artifacts"] + (["model version"] if promoted else [])
    if client.missed:
        _missed_artifact(client, tracked, config)
    else:
        from prefect import get_run_logger

        get_run_logger().info("MLflow run %s: logged in %.2f s", tracked.url, client.seconds)
    return TrackingReport(url=tracked.url, model_version=tracked.model_version, missed=client.missed,
                          seconds=round(client.seconds, 3))


def end_failed_tracking(flow, flow_run, state) -> None:
    """Flow hook (on_failure, on_crashed): mark the flow run's MLflow run failed rather than left running."""
    client, tracked = _OPEN.pop(str(flow_run.id), (None, None))
    if client is not None and tracked.run_id:
        client.call("the run's end", lambda c: c.set_terminated(tracked.run_id, "FAILED"))


def _log_results(client: TrackingClient, mlflow_run: str, config: FinetuneConfig, run: RunInfo, manifest: dict,
                 promoted: bool) -> None:
    plan_params, plan_metrics = plan_record(manifest)
    client.call("plan params", lambda c: _log_params(c, mlflow_run, plan_params))
    steps = step_metrics(manifest["training"]["history"])
    client.call(f"per-step metrics ({len(steps)} values)", lambda c: _log_metrics(c, mlflow_run, steps))
    totals = [(key, value, 0) for key, value in {**score_metrics(manifest["evaluation"]), **plan_metrics}.items()]
    client.call("scores and plan metrics", lambda c: _log_metrics(c, mlflow_run, totals))
    client.call("promotion tags", lambda c: [c.set_tag(mlflow_run, key, value) for key, value in {
        "finetune.promoted": str(promoted).lower(),
        "finetune.gate": (manifest.get("promotion") or {}).get("reason", "")[:5000]}.items()])
    report = summary_markdown(manifest, run.output_uri, config.evaluation.examples_in_report, promoted)
    client.call("artifact report.md", lambda c: c.log_text(mlflow_run, report, "report.md"))
    client.call("artifact quarantine_counts.json",
                lambda c: c.log_dict(mlflow_run, quarantine_counts(manifest["data"]), "quarantine_counts.json"))
    for name in (LOSS_CURVE_NAME, MANIFEST_NAME):  # the published bytes, read back from the output
        client.call(f"artifact {name}", lambda c, name=name: _log_published_file(c, mlflow_run, run.output_uri, name))


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:  # the kind: MLflow's UI opens it on its model-training pages (charts, params), not its GenAI ones
        return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # another run created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _log_params(client, mlflow_run: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(mlflow_run, params=items[start:start + PARAMS_PER_BATCH])


def _log_metrics(client, mlflow_run: str, values: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(key, value, now, step) for key, value, step in values]
    for start in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(mlflow_run, metrics=items[start:start + METRICS_PER_BATCH])


def _log_published_file(client, mlflow_run: str, output_uri: str, name: str) -> None:
    with tempfile.TemporaryDirectory(prefix="mlflow-artifact-") as folder:
        path = Path(folder) / name
        path.write_bytes(read_object(join_uri(output_uri, name)).data)
        client.log_artifact(mlflow_run, str(path))


def _link_artifact(tracked: TrackedRun, run: RunInfo) -> None:
    from prefect.artifacts import create_link_artifact

    create_link_artifact(link=tracked.url, link_text=f"MLflow run {tracked.run_id}", key="mlflow-run",
                         description=f"The MLflow run tracking fine-tuning run {run.run_id}")


def _missed_artifact(client: TrackingClient, tracked: TrackedRun, config: FinetuneConfig) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = "\n".join(f"- {what}" for what in client.missed)
    create_markdown_artifact(
        f"# MLflow tracking incomplete\n\nMLflow at `{config.tracking.uri}` failed: `{client.error}`.\n\n"
        f"MLflow run: {tracked.url or 'none (not created)'}\n\nNot logged:\n{lines}\n",
        key="mlflow-tracking", description=f"MLflow tracking missed {len(client.missed)} item(s)")
