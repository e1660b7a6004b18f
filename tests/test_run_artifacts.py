"""What a run shows in Prefect besides tables, and the S3 parts Prefect users bring along: real flow runs on the
tiny model against the embedded Prefect server, and S3 over HTTP to moto's server.

- the progress artifact training updates (steps done of the total), the loss curve as an image (a markdown
  artifact with the PNG inside), link artifacts to the published run and its model card;
- a prefect-aws AwsCredentials block as the run's only S3 credentials, region and endpoint, reaching the
  torchrun training processes (rank 0 uploads checkpoints from its own process) and with role assumption;
- the cached validation result in S3 (the default beside an S3 output), so another worker reuses it.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import DEMO_DATA, ROOT, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CA_BUNDLE", "AWS_PROFILE")


def run_artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def embedded_png(markdown: str) -> bytes:
    match = re.search(r"!\[loss curve\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:300]
    return base64.b64decode(match.group(1))


def test_a_run_shows_its_progress_loss_curve_and_links_to_the_run_and_card(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    from flows.finetune import finetune

    config = tiny_config(tiny_model, tmp_path, method="lora", artifacts={"progress_every_s": 0.5})
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    artifacts = run_artifacts(state.state_details.flow_run_id)
    run_dir = tmp_path / "out" / "runs" / result.run_id

    progress = artifacts["finetune-training-progress"]
    assert (progress.type, progress.data, progress.description) == ("progress", 100.0, "training: 8 of 8 steps")
    curve = artifacts["finetune-loss-curve"]
    assert curve.type == "markdown"
    assert embedded_png(curve.data) == (run_dir / "loss_curve.png").read_bytes()  # the published PNG itself
    links = {key: artifacts[key].data for key in ("finetune-run", "finetune-model-card")}
    assert links["finetune-run"] == f"[{run_dir / 'manifest.json'}]({(run_dir / 'manifest.json').as_uri()})"
    card = run_dir / "merged" / "README.md"
    assert links["finetune-model-card"] == f"[{card}]({card.as_uri()})"
    # the published card parses back, its eval results the manifest's tuned scores
    manifest = json.loads((run_dir / "manifest.json").read_text())
    results = {r.metric_type: r.metric_value for r in ModelCard.load(card).data.eval_results}
    assert results["exact_match"] == pytest.approx(manifest["evaluation"]["tuned"]["scores"]["exact_match"])
    assert results["eval_loss"] == pytest.approx(manifest["evaluation"]["tuned"]["loss"], abs=1e-6)


def test_artifacts_can_be_turned_off(tiny_model, tmp_path):
    from flows.finetune import finetune

    config = tiny_config(tiny_model, tmp_path, method="lora", training={
        "max_steps": 2, "batch_size": 8, "max_seq_len": 128, "eval_every": 2, "early_stopping_patience": 0},
        artifacts={"progress": False, "loss_curve": False, "links": False})
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    keys = set(run_artifacts(state.state_details.flow_run_id))
    assert "finetune-summary" in keys and not keys & {"finetune-training-progress", "finetune-loss-curve",
                                                       "finetune-run", "finetune-model-card"}


def save_aws_block(name: str, endpoint: str, **fields) -> None:
    from prefect_aws import AwsCredentials

    AwsCredentials(aws_access_key_id="AKIABLOCKQ7X9", aws_secret_access_key="block-secret", region_name="eu-west-1",
                   aws_client_parameters={"endpoint_url": endpoint}, **fields).save(name, overwrite=True)


def only_the_block(monkeypatch) -> None:
    """No AWS settings in the environment: the run can reach S3 only through the block. Each variable is
    recorded by monkeypatch, so what the run puts there is undone after the test."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_an_aws_credentials_block_serves_the_whole_run_and_the_validation_cache_is_shared_through_s3(
        tiny_model, empty_bucket, s3_server, tmp_path, monkeypatch):
    import boto3

    from flows.finetune import finetune

    s3 = boto3.client("s3")
    for name in ("train.jsonl", "eval.jsonl"):
        s3.upload_file(str(DEMO_DATA / name), empty_bucket, f"datasets/{name}")
    save_aws_block("s3-publisher-aws", s3_server)
    only_the_block(monkeypatch)
    config = tiny_config(tiny_model, tmp_path, method="lora", output=f"s3://{empty_bucket}/models",
                         data=f"s3://{empty_bucket}/datasets/train.jsonl",
                         eval_data=f"s3://{empty_bucket}/datasets/eval.jsonl", aws_credentials_block="s3-publisher-aws")
    config.training = config.training.model_copy(update={"num_gpus": 2})  # torchrun: rank 0 uploads checkpoints
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIABLOCKQ7X9" and os.environ["AWS_ENDPOINT_URL"] == s3_server
    assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"

    s3 = boto3.client("s3")  # now from the block's settings, as the run had them
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=empty_bucket)["Contents"]]
    assert f"models/runs/{result.run_id}/manifest.json" in keys
    assert any(re.fullmatch(r"models/checkpoints/[^/]+/step-0000008/.+", k) for k in keys)  # from torchrun rank 0
    verdicts = [k for k in keys if k.startswith("models/prefect-results/ingest-verdict-")]
    assert len(verdicts) == 2  # train and eval files, beside the output
    local_results = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])  # this session's, shared by its tests
    assert not {k.rsplit("/", 1)[1] for k in verdicts} & {p.name for p in local_results.rglob("*")}

    artifacts = run_artifacts(state.state_details.flow_run_id)
    assert artifacts["finetune-training-progress"].data == 100.0  # fed by rank 0's progress lines
    manifest_uri = f"s3://{empty_bucket}/models/runs/{result.run_id}/manifest.json"
    url = re.fullmatch(r"\[(.+)\]\((.+)\)", artifacts["finetune-run"].data)
    assert url.group(1) == manifest_uri and "X-Amz-Signature=" in url.group(2)
    # a browser with no credentials opens the presigned link
    answer = httpx.get(url.group(2), timeout=30)
    assert answer.status_code == 200 and json.loads(answer.content)["run"]["run_id"] == result.run_id

    # Another worker (its own work folder and an empty local result store) reuses the verdicts from S3.
    again = ingest_elsewhere(config.model_copy(update={"work_dir": str(tmp_path / "other-worker")}))
    assert [s.validation for s in again.sources] == ["cached", "cached"]


def ingest_elsewhere(config):
    from prefect import flow

    from tasks.ingest import ingest
    from tasks.runs import start_run

    @flow(name="ingest-on-another-worker")
    def ingest_only():
        return ingest(config, start_run(config))

    return ingest_only()


def test_an_aws_credentials_block_assumes_its_role_and_child_processes_get_the_keys(
        empty_bucket, s3_server, monkeypatch):
    from tasks.credentials import use_s3_credentials

    save_aws_block("role-block", s3_server, assume_role_arn="arn:aws:iam::123456789012:role/finetune",
                   assume_role_kwargs={"RoleSessionName": "finetune-test"})
    only_the_block(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3_server)  # prefect-aws's STS client: moto serves STS too
    use_s3_credentials(None, logging.getLogger("test"), "role-block")
    assumed = os.environ["AWS_ACCESS_KEY_ID"]
    assert assumed != "AKIABLOCKQ7X9" and os.environ["AWS_SESSION_TOKEN"]  # the role's temporary keys
    assert (os.environ["AWS_ENDPOINT_URL"], os.environ["AWS_DEFAULT_REGION"]) == (s3_server, "eu-west-1")
    # a child process (as torchrun's are) finds them in its environment and reaches the bucket
    child = subprocess.run(
        [sys.executable, "-c", "import boto3; s = boto3.session.Session(); c = s.client('s3');"
         f"c.head_bucket(Bucket={empty_bucket!r}); print(s.get_credentials().access_key, s.region_name)"],
        capture_output=True, text=True, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_STS"})
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == [assumed, "eu-west-1"]


def test_a_wrong_aws_block_fails_clearly_and_both_kinds_at_once_are_refused(s3_server, tiny_model, tmp_path):
    from tasks.credentials import use_s3_credentials

    with pytest.raises(ValueError, match="no AwsCredentials block named 'not-created'"):
        use_s3_credentials(None, logging.getLogger("test"), "not-created")
    save_aws_block("unsafe-block", s3_server)
    from prefect_aws import AwsCredentials

    block = AwsCredentials.load("unsafe-block")
    block.aws_client_parameters.verify = False
    block.save("unsafe-block", overwrite=True)
    with pytest.raises(ValueError, match="verify=False is not applied"):
        use_s3_credentials(None, logging.getLogger("test"), "unsafe-block")
    with pytest.raises(ValueError, match="aws_credentials_secret and aws_credentials_block are both set"):
        tiny_config(tiny_model, tmp_path, aws_credentials_secret="a", aws_credentials_block="b")


def test_an_unreachable_api_costs_the_progress_artifact_a_warning_never_the_training():
    """The progress artifact against an API that refuses connections: one warning, and the training's calls
    (a step, the close at the end) neither raise nor wait."""
    import time

    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tasks.reports.settings import ArtifactSettings
    from tasks.train import TrainingProgress

    class Recorded(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    log, recorded = logging.getLogger("progress-test"), Recorded()
    log.addHandler(recorded)
    try:
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
            started = time.perf_counter()
            progress = TrainingProgress(ArtifactSettings(progress_every_s=0.5), log)
            progress(1, 4)
            progress(4, 4)
            progress.close()
            elapsed = time.perf_counter() - started
    finally:
        log.removeHandler(recorded)
    assert progress.artifact_id is None and progress.updates == 0
    assert len(recorded.messages) == 1, recorded.messages
    assert "finetune-training-progress could not be sent" in recorded.messages[0]
    assert "training goes on" in recorded.messages[0] and elapsed < 30
