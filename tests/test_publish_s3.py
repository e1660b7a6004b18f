"""Publishing run folders to S3 over real HTTP (moto's server on 127.0.0.1, behind a fault-injecting
proxy): checksums, multipart, idempotent re-publish, and faults in the middle of a multipart upload."""
import json
import os

import boto3
import pytest

from tasks.store.manifest import MANIFEST_SCHEMA, file_entries, verify_files
from tasks.store.objects import StorageNotFoundError, is_transient
from tasks.store.registry import fetch_run, read_latest, promote, run_uri
from tasks.store.transfer import local_checksums, upload_folder

pytestmark = pytest.mark.integration
PART = 5 * 2**20  # S3's smallest multipart part
BIG = 2 * PART + 123  # three parts


@pytest.fixture
def bucket(empty_bucket):
    return empty_bucket


def stage_run(folder, big_files=("merged/model-00001-of-00002.safetensors", "merged/model-00002-of-00002.safetensors")):
    """A run folder shaped like a real one: large shards, small json files, a manifest listing them."""
    for name in big_files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(os.urandom(BIG))
    (folder / "merged" / "config.json").write_text('{"model_type": "llama"}')
    (folder / "merged" / "README.md").write_text("# model card")
    manifest = {"schema": MANIFEST_SCHEMA, "run": {"run_id": folder.name}, "files": file_entries(folder)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def keys(bucket, prefix):
    return sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_upload_sends_checksums_and_content_types_then_resends_nothing(proxy, bucket, tmp_path):
    staged = stage_run(tmp_path / "run-1")
    dest = run_uri(f"s3://{bucket}/models", "run-1")
    first = upload_folder(staged, dest, PART)
    assert first.files_sent == 5 and first.files_skipped == 0

    s3 = boto3.client("s3")
    shard = "models/runs/run-1/merged/model-00001-of-00002.safetensors"
    head = s3.head_object(Bucket=bucket, Key=shard, ChecksumMode="ENABLED")
    sha256_hex, s3_checksum = local_checksums(staged / shard.removeprefix("models/runs/run-1/"), PART)
    assert head["ChecksumSHA256"].split("-")[0] == s3_checksum  # composite over 3 parts, computed by S3
    assert head["Metadata"]["sha256"] == sha256_hex and head["ContentType"] == "application/octet-stream"
    assert any("partNumber=3" in s.path and "model-00001" in s.path for s in proxy.sent)  # really multipart
    assert s3.head_object(Bucket=bucket, Key="models/runs/run-1/merged/config.json")["ContentType"] == "application/json"
    assert s3.head_object(Bucket=bucket, Key="models/runs/run-1/manifest.json")["ContentType"] == "application/json"

    proxy.clear()
    again = upload_folder(staged, dest, PART)
    assert again.bytes_sent == 0 and again.files_skipped == 5  # 4 files and the manifest
    assert proxy.bytes_sent_to("models/runs/run-1/") == 0  # measured on the wire, not by our own counters

    fetched = tmp_path / "fetched"
    fetch_run(f"s3://{bucket}/models", "run-1", fetched)
    assert verify_files(fetched) == []


def test_a_different_manifest_at_the_destination_is_refused_before_any_upload(proxy, bucket, tmp_path):
    dest = run_uri(f"s3://{bucket}/models", "run-1")
    upload_folder(stage_run(tmp_path / "run-1"), dest, PART)
    other = stage_run(tmp_path / "other" / "run-1")
    proxy.clear()
    with pytest.raises(FileExistsError, match="another manifest"):
        upload_folder(other, dest, PART)
    assert proxy.bytes_sent_to("models/") == 0


@pytest.mark.parametrize("fault", ["drop", 500, 503])
def test_transient_faults_in_the_middle_of_a_multipart_upload_are_retried(proxy, bucket, tmp_path, fault):
    staged = stage_run(tmp_path / "run-1")
    proxy.inject("PUT", "model-00001-of-00002.safetensors&partNumber=2", fault, times=2)
    upload_folder(staged, run_uri(f"s3://{bucket}/models", "run-1"), PART)
    assert proxy.faults[0].hits == 2  # both faults really happened, and botocore retried past them
    fetched = tmp_path / "fetched"
    fetch_run(f"s3://{bucket}/models", "run-1", fetched)
    assert verify_files(fetched) == []


def test_a_failed_upload_leaves_no_manifest_and_a_second_attempt_resends_only_what_is_missing(proxy, bucket, tmp_path):
    output = f"s3://{bucket}/models"
    upload_folder(stage_run(tmp_path / "run-1", big_files=("merged/model.safetensors",)), run_uri(output, "run-1"))
    promote(output, "run-1", {"promote": True})
    staged = stage_run(tmp_path / "run-2")
    proxy.inject("PUT", "model-00002-of-00002.safetensors&partNumber=2", 503, times=None)  # S3 stays down for it
    with pytest.raises(Exception) as failed:
        upload_folder(staged, run_uri(output, "run-2"), PART)
    assert is_transient(failed.value)  # so the Prefect task retries it, and only it
    published = keys(bucket, "models/runs/run-2/")
    assert "models/runs/run-2/manifest.json" not in published
    assert "models/runs/run-2/merged/model-00002-of-00002.safetensors" not in published
    assert "models/runs/run-2/merged/model-00001-of-00002.safetensors" in published  # it finished
    assert boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted
    with pytest.raises(StorageNotFoundError):  # half a run cannot be promoted: it has no manifest yet
        promote(output, "run-2", {"promote": True})
    assert read_latest(output)["run_id"] == "run-1"

    proxy.clear()
    stats = upload_folder(staged, run_uri(output, "run-2"), PART)
    assert proxy.bytes_sent_to("model-00001-of-00002") == 0  # finished files are not sent again
    assert proxy.bytes_sent_to("model-00002-of-00002") == BIG
    assert stats.bytes_sent == BIG + (staged / "manifest.json").stat().st_size
    promote(output, "run-2", {"promote": True})
    assert read_latest(output)["run_id"] == "run-2"
