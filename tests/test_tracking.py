"""MLflow tracking (config `tracking`): the settings, what a run logs, and a server that is down.

The unit tests need no server. The integration tests start a real `mlflow server` process (SQLite backend
store, artifacts proxied to moto's S3 server; tests/mlflow_stack.py) and run the flow on the tiny model
against a real temporary Prefect server: params, per-step metrics, scores, artifacts (in the S3 bucket),
the registered model version with the `champion` alias, and the CLI's promote/rollback moving it. A last
test opens the run in the MLflow UI in Chromium and saves screenshots to tests/artifacts/.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from pydantic import ValidationError

from conftest import SUMMARY_LINES, tiny_config
from mlflow_stack import MLFLOW_BUCKET
from tasks.config import FinetuneConfig
from tasks.tracking.client import TrackingClient
from tasks.tracking.records import flat_params, quarantine_counts, score_metrics, step_metrics
from tasks.tracking.settings import TrackingSettings


def test_tracking_is_off_by_default_and_a_bad_uri_names_the_field_and_the_fix():
    assert not FinetuneConfig(model="org/name", data="train.jsonl").tracking.enabled
    assert not TrackingSettings(uri="  ").enabled  # the UI form sends "" for an emptied field
    with pytest.raises(ValidationError) as error:
        FinetuneConfig(model="org/name", data="train.jsonl", tracking={"uri": "mlflow:5000"})
    assert "tracking.uri='mlflow:5000' is not an MLflow server URL: give http(s)://host:port" in str(error.value)
    settings = TrackingSettings(uri="http://mlflow:5000", experiment="chat-bots")
    assert settings.enabled and settings.model_name == "chat-bots"  # registered under the experiment's name


def test_the_whole_config_becomes_flat_params():
    config = FinetuneConfig(model="org/name", data="train.jsonl", training={"learning_rate": 3e-4},
                            tracking={"uri": "http://mlflow:5000"})
    params = flat_params(config.model_dump(mode="json"))
    assert params["training.learning_rate"] == "0.0003" and params["model"] == "org/name"
    assert params["evaluation.metrics"] == '["exact_match"]'  # a list, as JSON
    assert params["eval_data"] == "null" and params["tracking.uri"] == "http://mlflow:5000"
    assert not any(isinstance(v, dict) for v in params.values()) and len(params) > 60


def test_history_scores_and_quarantine_as_mlflow_values():
    history = [{"step": 1, "train_loss": 2.0, "lr": 1e-3, "tokens_per_s": 50.0, "answer_tokens_per_s": 20.0},
               {"step": 2, "train_loss": 1.5, "lr": 1e-3, "tokens_per_s": 60.0, "answer_tokens_per_s": 25.0,
                "eval_loss": 1.7}]
    metrics = step_metrics(history)
    assert ("train/loss", 1.5, 2) in metrics and ("eval/loss", 1.7, 2) in metrics
    assert [m for m in metrics if m[0] == "eval/loss"] == [("eval/loss", 1.7, 2)]  # only where evaluated
    assert {m[0] for m in metrics} == {"train/loss", "train/learning_rate", "train/tokens_per_s",
                                       "train/answer_tokens_per_s", "eval/loss"}
    scores = score_metrics({"base": {"scores": {"chrf": 0.2}, "loss": 2.0, "perplexity": 7.4},
                            "tuned": {"scores": {"chrf": 0.5}, "loss": 1.0, "perplexity": 2.7}, "published": None})
    assert scores == {"base/chrf": 0.2, "base/eval_loss": 2.0, "base/perplexity": 7.4,
                      "tuned/chrf": 0.5, "tuned/eval_loss": 1.0, "tuned/perplexity": 2.7}
    counts = quarantine_counts({"sources": [{"uri": "a.jsonl", "read": 10, "rows": 8, "quarantined": 2,
                                             "problems": {"not_blank": 2}}]})
    assert counts == {"sources": [{"uri": "a.jsonl", "read": 10, "kept": 8, "quarantined": 2,
                                   "rules": {"not_blank": 2}}], "quarantined": 2}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed: connections are refused


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (a hung MLflow)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


@pytest.mark.parametrize("server", ["refused", "hung"])
def test_a_dead_server_costs_one_timeout_warns_once_and_records_every_miss(server, silent_server, request):
    import mlflow  # noqa: F401  (imported before the clock starts: its import time is measured on its own)

    port = closed_port() if server == "refused" else silent_server
    warnings = []
    client = TrackingClient(TrackingSettings(uri=f"http://127.0.0.1:{port}", request_timeout_s=1), warnings.append)
    started = time.perf_counter()
    assert client.call("experiment", lambda c: c.get_experiment_by_name("x")) is None
    first = time.perf_counter() - started
    sent = []
    for what in ("params", "metrics", "artifact loss_curve.png"):
        assert client.call(what, lambda c: sent.append(what)) is None
    total = time.perf_counter() - started
    assert sent == []  # once off, later calls never reach MLflow
    assert client.missed == ["experiment", "params", "metrics", "artifact loss_curve.png"]
    assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0] and "the run goes on" in warnings[0]
    # One request timeout (1 s) and no retries: mlflow's defaults (120 s, 7 retries with backoff) take minutes.
    assert total < 1 + 5
    request.config.stash.setdefault(SUMMARY_LINES, []).append(
        f"MLflow {server} server: tracking gave up after {first:.2f} s; {len(client.missed)} calls cost {total:.2f} s")


# --- Against the real servers -------------------------------------------------------------------------------

def mlflow_run_of(result, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server["uri"])
    return client, client.get_run(result.tracking.url.rsplit("/", 1)[-1])


@pytest.fixture(scope="module")
def tracked(mlflow_server, tiny_model, tmp_path_factory, prefect_api):
    """Two tracked flow runs into one output, both promoted (the gate lets any score through), with the same
    run untracked between them (into another output) for the wall times."""
    from flows.finetune import finetune

    folder = tmp_path_factory.mktemp("tracked")
    tracking = {"uri": mlflow_server["uri"], "experiment": "tiny-chat", "registered_model": "tiny-chat-model"}
    runs, seconds = {}, {}
    for name, settings, output in (("first", tracking, "out"), ("untracked", {}, "untracked"),
                                   ("second", tracking, "out")):
        started = time.perf_counter()
        runs[name] = finetune(tiny_config(tiny_model, folder, method="lora", tracking=settings,
                                          output=str(folder / output), publish={"min_improvement": -1.0}))
        seconds[name] = time.perf_counter() - started
    return {"runs": runs, "seconds": seconds, "output": str(folder / "out"), "model": tracking["registered_model"]}


@pytest.mark.integration
def test_a_tracked_run_shows_params_step_metrics_scores_artifacts_and_the_champion(tracked, mlflow_server, request):
    from test_flow import latest_artifact

    first, second = tracked["runs"]["first"], tracked["runs"]["second"]
    assert first.tracking.missed == [] and second.tracking.missed == [] and second.promoted
    client, run = mlflow_run_of(second, mlflow_server)
    manifest = json.loads(open(f"{second.output_uri}/manifest.json").read())
    assert manifest["run"]["tracking"]["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == second.run_id
    assert run.data.tags["prefect.flow_run_id"] == manifest["run"]["flow_run_id"]
    assert manifest["run"]["flow_run_id"] in run.data.tags["prefect.flow_run_url"]

    # The whole config as params, and the plan.
    params = run.data.params
    assert params["training.learning_rate"] == "0.003" and params["lora.r"] == "8" and params["method"] == "lora"
    assert params["tracking.registered_model"] == "tiny-chat-model" and params["plan.method"] == "lora"

    # Per-step metrics with their step numbers, exactly the training history.
    history = manifest["training"]["history"]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(r["step"], pytest.approx(r["train_loss"])) for r in history]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [4, 8]
    for key in ("train/learning_rate", "train/tokens_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 9))
    metrics = run.data.metrics
    assert metrics["tuned/exact_match"] == pytest.approx(second.tuned_score)
    assert metrics["base/eval_loss"] == pytest.approx(second.base_eval_loss)
    assert metrics["plan/measured_peak_bytes"] == manifest["training"]["peak_memory_bytes"]
    assert metrics["plan/estimated_peak_bytes"] == manifest["plan"]["estimate"]["total"]

    # The artifacts, stored by the server in the S3 bucket: the manifest byte for byte as published.
    names = {"loss_curve.png", "manifest.json", "report.md", "quarantine_counts.json"}
    assert {f.path for f in client.list_artifacts(run.info.run_id)} == names
    keys = [o["Key"] for o in mlflow_server["s3"].list_objects_v2(Bucket=MLFLOW_BUCKET)["Contents"]]
    stored = {key.rsplit("/", 1)[-1]: key for key in keys if f"/{run.info.run_id}/" in key}
    assert set(stored) == names
    body = mlflow_server["s3"].get_object(Bucket=MLFLOW_BUCKET, Key=stored["manifest.json"])["Body"].read()
    assert body == open(f"{second.output_uri}/manifest.json", "rb").read()

    # Each promoted run is a version; the alias is on the run latest.json points at.
    champion = client.get_model_version_by_alias("tiny-chat-model", "champion")
    assert champion.run_id == run.info.run_id and champion.tags["finetune.run_id"] == second.run_id
    assert champion.source == f"runs:/{run.info.run_id}/"  # a local output; an s3:// output is the source itself
    assert len(client.search_model_versions("name='tiny-chat-model'")) == 2

    # And Prefect links to the MLflow run.
    assert second.tracking.url in latest_artifact("mlflow-run").data
    seconds = tracked["seconds"]
    request.config.stash.setdefault(SUMMARY_LINES, []).append(
        "flow runs (tiny LoRA, 8 steps): tracked {first:.1f} s (mlflow imported), untracked {untracked:.1f} s, "
        "tracked {second:.1f} s; ".format(**seconds) + f"in MLflow calls: {first.tracking.seconds:.2f} s and "
        f"{second.tracking.seconds:.2f} s")


@pytest.mark.integration
def test_promote_and_rollback_move_the_champion_alias(tracked, mlflow_server, capsys):
    from tasks.cli import main

    first, second = tracked["runs"]["first"], tracked["runs"]["second"]
    client, first_run = mlflow_run_of(first, mlflow_server)
    second_run = mlflow_run_of(second, mlflow_server)[1]
    assert main(["rollback", tracked["output"]]) == 0
    assert "alias champion -> version 1" in capsys.readouterr().out
    assert client.get_model_version_by_alias("tiny-chat-model", "champion").run_id == first_run.info.run_id
    assert main(["promote", tracked["output"], second.run_id]) == 0
    assert "alias champion -> version 2" in capsys.readouterr().out
    assert client.get_model_version_by_alias("tiny-chat-model", "champion").run_id == second_run.info.run_id
    assert len(client.search_model_versions("name='tiny-chat-model'")) == 2  # a run keeps its one version


@pytest.mark.integration
def test_a_run_published_to_s3_is_registered_with_its_s3_folder_as_source(mlflow_server):
    from mlflow import MlflowClient

    from tasks.tracking.champion import move_champion

    mlflow = MlflowClient(mlflow_server["uri"])
    run = mlflow.create_run(mlflow.create_experiment("s3-output"))
    client = TrackingClient(TrackingSettings(uri=mlflow_server["uri"]), pytest.fail)
    output_uri = "s3://models/support/runs/20261201-000000-abcdef12"
    assert move_champion(client, "s3-model", run.info.run_id, output_uri) == "1"
    assert move_champion(client, "s3-model", run.info.run_id, output_uri) == "1"  # again: the same version
    version = mlflow.get_model_version_by_alias("s3-model", "champion")
    assert version.source == output_uri and version.tags["finetune.run_id"] == "20261201-000000-abcdef12"
    assert client.missed == []

@pytest.mark.integration
def test_a_flow_run_that_fails_marks_its_mlflow_run_failed(mlflow_server, tiny_model, tmp_path, prefect_api):
    from mlflow import MlflowClient

    from flows.finetune import finetune

    state = finetune(tiny_config(tiny_model, tmp_path, data=str(tmp_path / "missing.jsonl"), eval_data=None,
                                 tracking={"uri": mlflow_server["uri"], "experiment": "fails"}), return_state=True)
    assert state.is_failed() and "missing.jsonl: file not found" in str(state.result(raise_on_failure=False))
    client = MlflowClient(mlflow_server["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.params["data"] == str(tmp_path / "missing.jsonl")  # the config was logged before it failed

@pytest.mark.integration
def test_a_run_with_mlflow_down_completes_warns_once_and_records_what_it_missed(tiny_model, tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.finetune import finetune
    from test_flow import latest_artifact

    state = finetune(tiny_config(tiny_model, tmp_path, method="lora", publish={"min_improvement": -1.0},
                                 tracking={"uri": f"http://127.0.0.1:{closed_port()}"}), return_state=True)
    result = state.result()
    assert state.is_completed() and result.promoted and (tmp_path / "out" / "latest.json").is_file()
    assert result.tracking.url is None and result.tracking.model_version is None
    assert result.tracking.missed == ["experiment 'prefect-finetune'", "params (the config)", "metrics", "plan",
                                      "scores", "artifacts", "model version"]
    missed = latest_artifact("mlflow-tracking").data
    assert "ConnectionError" in missed and "- model version" in missed
    manifest = json.loads((tmp_path / "out" / "runs" / result.run_id / "manifest.json").read_text())
    assert manifest["run"]["tracking"]["run_id"] is None  # the published run says it has no MLflow run

    deadline = time.monotonic() + 30  # logs reach the server in the background
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[state.state_details.flow_run_id])))
        warned = [log.message for log in logs if "MLflow tracking at" in log.message]
        if warned or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(warned) == 1 and "the run goes on" in warned[0]


@pytest.mark.integration
def test_the_mlflow_ui_shows_the_run_its_curves_and_the_champion(tracked, mlflow_server):
    """Headless Chromium on the MLflow UI, as tests/test_ui_run_form.py drives the Prefect UI; screenshots
    mlflow-runs.png (the experiment's runs), mlflow-run.png (tags, registered version, metrics),
    mlflow-run-params.png, mlflow-run-curves.png and
    mlflow-model.png (the versions and the alias)."""
    from local_browser import ARTIFACTS, local_page

    second = tracked["runs"]["second"]
    with local_page(1500, 1400) as (page, blocked):
        try:
            _screenshots(page, second.tracking.url, second.run_id, mlflow_server["uri"])
        except Exception:  # what the browser showed, for the person reading the failure
            page.screenshot(path=str(ARTIFACTS / "mlflow-failed.png"))
            (ARTIFACTS / "mlflow-failed.txt").write_text(page.inner_text("body"))
            raise
        print(f"\nscreenshots: {ARTIFACTS}/mlflow-*.png; blocked: {blocked}")


def show(page, url: str | None, expected: tuple[str, ...], by_placeholder: bool = False) -> None:
    """Open `url` (None: stay) and wait until each of `expected` is on the page (the UI loads in pieces)."""
    if url:
        page.goto(url, wait_until="load", timeout=120_000)  # the UI polls: never "networkidle"
    for text in expected:
        found = page.get_by_placeholder(text) if by_placeholder else page.get_by_text(text, exact=False)
        found.first.wait_for(timeout=90_000)


def _screenshots(page, run_url: str, run_name: str, uri: str) -> None:
    from local_browser import ARTIFACTS

    show(page, run_url, (run_name, "tiny-chat-model", "train/loss"))
    # MLflow 3 opens on its GenAI pages; "Model training" leads to the experiment's runs, with their versions
    page.get_by_text("Model training", exact=True).first.click()
    show(page, None, ("Runs", run_name[:12], "tiny-chat-model"))
    page.screenshot(path=str(ARTIFACTS / "mlflow-runs.png"))
    show(page, run_url, (run_name, "Registered models", "train/loss"))
    page.screenshot(path=str(ARTIFACTS / "mlflow-run.png"))  # tags, the model version, description, metrics
    params = page.get_by_text("training.learning_rate", exact=True).first
    params.scroll_into_view_if_needed(timeout=90_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow-run-params.png"))
    show(page, f"{run_url}/model-metrics", ("Search metric charts",), by_placeholder=True)
    page.get_by_placeholder("Search metric charts").fill("loss")
    show(page, None, ("(train/loss)", "(eval/loss)"))  # the legends: drawn once the curves are
    page.screenshot(path=str(ARTIFACTS / "mlflow-run-curves.png"))
    show(page, f"{uri}/#/models/tiny-chat-model", ("champion", "Version 2", "Version 1"))
    page.screenshot(path=str(ARTIFACTS / "mlflow-model.png"))
