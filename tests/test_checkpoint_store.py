"""Training checkpoints in the output, local and on S3 (moto's server): complete ones only, newest
first, the run's own before other runs', pruned to the newest few; on S3 uploaded with the same
checksummed, verified transfer as published runs, and checked against their manifest on the way down."""
import json

import boto3
import pytest

from tasks.store.checkpoint_uploads import candidate_checkpoints, fetch_checkpoint, upload_checkpoint
from tasks.store.manifest import file_entries, sha256_file
from tasks.store.objects import join_uri
from tasks.store.transfer import ChecksumMismatchError, local_checksums


def checkpoint(tmp_path, name: str, fingerprint: str, saved_at: str, where: str = "local"):
    """A checkpoint folder as tasks/engine/checkpoints.py writes it: files, then a manifest listing them."""
    folder = tmp_path / where / name
    folder.mkdir(parents=True)
    (folder / "trainable.safetensors").write_bytes(b"weights " + name.encode())
    (folder / "best").mkdir()
    (folder / "best" / "adapter_config.json").write_text('{"r": 4}')
    state = {"step": int(name.split("-")[1]), "fingerprint": fingerprint}
    (folder / "manifest.json").write_text(json.dumps({"kind": "training-checkpoint", "saved_at": saved_at,
                                                      "state": state, "files": file_entries(folder)}))
    return folder


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
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


@pytest.mark.integration
def test_s3_checkpoints_go_through_the_checksummed_transfer(tmp_path, empty_bucket):
    output = f"s3://{empty_bucket}/models/support"
    folder = checkpoint(tmp_path, "step-0000002", "same", "2026-11-29T01:00")
    uri = upload_checkpoint(folder, output, "run-a", keep=2)
    s3 = boto3.client("s3")
    key = "models/support/checkpoints/run-a/step-0000002/trainable.safetensors"
    head = s3.head_object(Bucket=empty_bucket, Key=key, ChecksumMode="ENABLED")
    sha256_hex, s3_checksum = local_checksums(folder / "trainable.safetensors", 64 * 2**20)
    assert head["Metadata"]["sha256"] == sha256_hex == sha256_file(folder / "trainable.safetensors")
    assert head["ChecksumSHA256"] == s3_checksum  # computed by S3 from what it received

    s3.put_object(Bucket=empty_bucket, Key=key, Body=b"weights step-000000X")  # same size, other bytes
    with pytest.raises(ChecksumMismatchError, match="trainable.safetensors: sha256 differs"):
        fetch_checkpoint(uri, tmp_path / "fetched")
    assert not (tmp_path / "fetched" / "manifest.json").exists()


def test_saving_a_step_again_replaces_it(tmp_path, output):
    upload_checkpoint(checkpoint(tmp_path, "step-0000004", "same", "2026-11-29T01:00"), output, "run-a", keep=2)
    # A retry that went back to an older checkpoint saves step 4 again, with another manifest.
    again = checkpoint(tmp_path, "step-0000004", "same", "2026-11-29T05:00", where="retry")
    (again / "trainable.safetensors").write_bytes(b"retrained")
    (again / "manifest.json").unlink()
    (again / "manifest.json").write_text(json.dumps({"kind": "training-checkpoint", "saved_at": "2026-11-29T05:00",
                                                     "state": {"step": 4}, "files": file_entries(again)}))
    uri = upload_checkpoint(again, output, "run-a", keep=2)
    assert candidate_checkpoints(output, "run-a", None) == [uri]
    fetched = fetch_checkpoint(uri, tmp_path / "fetched")
    assert (fetched / "trainable.safetensors").read_bytes() == b"retrained"
    assert json.loads((fetched / "manifest.json").read_text())["saved_at"] == "2026-11-29T05:00"


def test_a_skipped_checkpoint_leaves_nothing_behind_in_the_folder_resumed_from(tmp_path, output):
    older = upload_checkpoint(checkpoint(tmp_path, "step-0000004", "same", "2026-11-29T01:00"), output, "run-a", keep=2)
    newer = checkpoint(tmp_path, "step-0000006", "same", "2026-11-29T01:01")
    (newer / "best" / "extra_state.safetensors").write_bytes(b"only in step 6")
    (newer / "manifest.json").unlink()
    (newer / "manifest.json").write_text(json.dumps({"kind": "training-checkpoint", "saved_at": "2026-11-29T01:01",
                                                     "state": {"step": 6}, "files": file_entries(newer)}))
    newer_uri = upload_checkpoint(newer, output, "run-a", keep=2)
    stored = join_uri(newer_uri, "trainable.safetensors")  # damaged after it was stored: same size, other bytes
    if output.startswith("s3://"):
        bucket, key = stored[5:].split("/", 1)
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"weights step-000000X")
    else:
        open(stored, "wb").write(b"weights step-000000X")
    resume_dir = tmp_path / "resume-from"
    with pytest.raises(ChecksumMismatchError):
        fetch_checkpoint(newer_uri, resume_dir)  # the train task skips it and tries the next
    fetched = fetch_checkpoint(older, resume_dir)
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == [
        "best/adapter_config.json", "manifest.json", "trainable.safetensors"]  # no file of step 6 survived
