"""Training checkpoints in the output, local and on S3 (moto's server): complete ones only, newest
first, the run's own before other runs', pruned to the newest few."""
import json

import boto3
import pytest

from tasks.store.checkpoint_uploads import candidate_checkpoints, fetch_checkpoint, upload_checkpoint
from tasks.store.objects import join_uri


def checkpoint(tmp_path, name: str, fingerprint: str, saved_at: str):
    folder = tmp_path / "local" / name
    folder.mkdir(parents=True)
    (folder / "trainable.safetensors").write_bytes(b"weights " + name.encode())
    state = {"step": int(name.split("-")[1]), "fingerprint": fingerprint}
    (folder / "manifest.json").write_text(json.dumps({"kind": "training-checkpoint", "saved_at": saved_at,
                                                      "state": state, "files": []}))
    return folder


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("empty_bucket")
    return f"s3://{bucket}/models/support"


@pytest.mark.integration
def test_newest_complete_checkpoints_first_and_old_ones_pruned(tmp_path, output):
    for step, saved_at in ((2, "2026-11-29T01:00"), (4, "2026-11-29T01:01"), (6, "2026-11-29T01:02")):
        upload_checkpoint(checkpoint(tmp_path, f"step-{step:07d}", "same", saved_at), output, "run-a", keep=2)
    upload_checkpoint(checkpoint(tmp_path, "step-0000003", "same", "2026-11-29T02:00"), output, "run-b", keep=2)
    upload_checkpoint(checkpoint(tmp_path, "step-0000009", "other", "2026-11-29T03:00"), output, "run-c", keep=2)
    _upload_without_manifest(tmp_path, output, "run-a", "step-0000008")  # a copy cut short

    own = [join_uri(output, "checkpoints", "run-a", s) for s in ("step-0000006", "step-0000004")]
    assert candidate_checkpoints(output, "run-a", None) == own  # step 2 pruned, step 8 incomplete
    assert candidate_checkpoints(output, "run-a", "same") == own + [
        join_uri(output, "checkpoints", "run-b", "step-0000003")]  # run-c trained something else
    assert candidate_checkpoints(output, "new-run", "same")[0] == join_uri(output, "checkpoints", "run-b",
                                                                           "step-0000003")
    assert candidate_checkpoints(output, "new-run", None) == []

    fetched = fetch_checkpoint(own[0], tmp_path / "fetched")
    assert (fetched / "trainable.safetensors").read_bytes() == b"weights step-0000006"


def _upload_without_manifest(tmp_path, output: str, run_key: str, step: str) -> None:
    if output.startswith("s3://"):
        bucket, prefix = output[5:].split("/", 1)
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/checkpoints/{run_key}/{step}/trainable.safetensors",
                                      Body=b"partial")
    else:
        folder = tmp_path / "out" / "checkpoints" / run_key / step
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"partial")
