"""Secrets never reach what a run leaves behind: the published output, the local work folder,
results, the run's Prefect logs, artifacts and parameters.

One flow run on the tiny model, publishing to S3 (moto), with an AWS secret key and a Hugging Face
token planted in the environment, or the AWS keys in a Prefect Secret block (and none in the
environment, so the run can only publish with the block's); then every byte the run wrote is
searched for them.
"""
import json
import os
from pathlib import Path

import pytest

from conftest import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]

PLANTED = {"AWS_SECRET_ACCESS_KEY": "planted-secret-XYZ123", "HF_TOKEN": "hf_plantedTokenQ7W9E2",
           "HUGGING_FACE_HUB_TOKEN": "hf_plantedTokenQ7W9E2", "AWS_SESSION_TOKEN": "planted-session-K4M8"}


def leaks(blob: bytes, where: str) -> list[str]:
    return [f"{where}: contains {name}" for name, secret in PLANTED.items() if secret.encode() in blob]


def files_leaking(folder) -> list[str]:
    return [problem for path in folder.rglob("*") if path.is_file() for problem in leaks(path.read_bytes(), str(path))]


def plant_secrets(source: str, monkeypatch) -> str | None:
    """The secrets in the environment, or the AWS ones in a Secret block; returns the block's name."""
    from prefect.blocks.system import Secret

    for name, secret in PLANTED.items():
        monkeypatch.setenv(name, secret)  # moto accepts any secret key, so the run still publishes
    if source == "environment":
        return None
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)  # recorded, so the keys the flow puts there are undone after the test
    Secret(value={"aws_access_key_id": "AKIAPLANTEDQ7", "aws_secret_access_key": PLANTED["AWS_SECRET_ACCESS_KEY"],
                  "aws_session_token": PLANTED["AWS_SESSION_TOKEN"]}).save("s3-publisher", overwrite=True)
    return "s3-publisher"


@pytest.mark.parametrize("source", ["environment", "secret block"])
def test_planted_secrets_appear_in_no_output_log_or_artifact(tiny_model, empty_bucket, tmp_path, monkeypatch,
                                                            source):
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.finetune import finetune

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTEDQ7")
    block = plant_secrets(source, monkeypatch)
    config = tiny_config(tiny_model, tmp_path, output=f"s3://{empty_bucket}/models", method="lora",
                         aws_credentials_secret=block,
                         training={"max_steps": 4, "batch_size": 8, "max_seq_len": 128, "eval_every": 4,
                                   "early_stopping_patience": 0, "learning_rate": 3e-3})
    state = finetune(config, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id

    problems = []
    s3 = boto3.client("s3")
    objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=empty_bucket)
               for o in page.get("Contents", [])]
    assert any(key.endswith("manifest.json") for key in objects)
    for key in objects:
        problems += leaks(s3.get_object(Bucket=empty_bucket, Key=key)["Body"].read(), f"s3://{empty_bucket}/{key}")
    problems += files_leaking(tmp_path)  # the work folder (checkpoints, staging, caches, quarantine)
    problems += files_leaking(Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]))  # task results

    APILogHandler().flush()  # logs are sent in batches: send the rest before reading them back
    with get_client(sync_client=True) as client:
        logs = []  # every log line, page by page (the server answers at most 200 at a time)
        while page := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                       limit=200, offset=len(logs)):
            logs += page
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        flow_run = client.read_flow_run(flow_run_id)
    assert logs and artifacts  # the run really logged and published artifacts: the scan below means something
    for log in logs:
        problems += leaks(log.message.encode(), f"log line {log.message[:60]!r}")
    for artifact in artifacts:
        problems += leaks(str(artifact.data).encode() + str(artifact.description).encode(), f"artifact {artifact.key}")
    problems += leaks(repr(flow_run.parameters).encode(), "the flow run's parameters")

    manifest_key = next(key for key in objects if key.endswith("manifest.json") and "/runs/" in key)
    manifest = json.loads(s3.get_object(Bucket=empty_bucket, Key=manifest_key)["Body"].read())
    # Item 1 of the security work: the manifest records what the model folder was allowed to do.
    assert manifest["config"]["model_loading"] == {"trust_remote_code": False, "allow_pickle_weights": False}
    assert manifest["base_model"]["loading"] == {"trust_remote_code": False, "allow_pickle_weights": False}
    if block:  # the run's S3 calls carried the block's keys (and its log says so, without the secret)
        assert any("Secret block 's3-publisher' (access key id ...EDQ7)" in log.message for log in logs)
    assert problems == []


def test_a_wrong_or_missing_secret_block_fails_naming_fields_never_values(monkeypatch):
    import logging

    from prefect.blocks.system import Secret

    from tasks.credentials import use_s3_credentials

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    Secret(value={"aws_access_key_id": "AKIAPLANTEDQ7", "secret_key": PLANTED["AWS_SECRET_ACCESS_KEY"]}).save(
        "misnamed-keys", overwrite=True)
    with pytest.raises(ValueError, match="must hold JSON with aws_access_key_id, aws_secret_access_key") as wrong:
        use_s3_credentials("misnamed-keys", logging.getLogger("test"))
    assert "lacks aws_secret_access_key" in str(wrong.value) and not leaks(str(wrong.value).encode(), "error")
    with pytest.raises(ValueError, match="no Secret block named 'not-created'"):
        use_s3_credentials("not-created", logging.getLogger("test"))
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ  # nothing half-applied
