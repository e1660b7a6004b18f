"""The storage layer (tasks/store/objects.py, tasks/store/transfer.py): one uploader and one downloader
for local folders and S3, one way to read a small object, one listing of child folders; S3 is moto's
server on 127.0.0.1 (real HTTP)."""
import json

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError

from tasks.store.manifest import file_entries
from tasks.store.objects import (StorageNotFoundError, etag_of, is_not_found, is_transient, list_children,
                                 read_object, write_object)
from tasks.store.transfer import ChecksumMismatchError, download_folder, upload_folder


def staged(tmp_path, name="stage", manifest=None):
    folder = tmp_path / name
    (folder / "merged").mkdir(parents=True, exist_ok=True)
    (folder / "merged" / "model.safetensors").write_bytes(b"weights")
    (folder / "manifest.json").write_text(json.dumps(manifest or {"run": 1}))
    return folder


def listed(tmp_path, name="listed"):
    """A folder whose manifest lists its files with their sha256, as runs and checkpoints have."""
    folder = staged(tmp_path, name)
    (folder / "manifest.json").unlink()
    (folder / "config.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps({"files": file_entries(folder)}))
    return folder


def test_local_upload_is_atomic_and_idempotent(tmp_path):
    dest = tmp_path / "out" / "run-1"
    first = upload_folder(staged(tmp_path), str(dest))
    assert first.files_sent == 2 and first.files_skipped == 0
    assert (dest / "merged" / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in dest.parent.iterdir()] == ["run-1"]  # no .partial left behind
    again = upload_folder(staged(tmp_path), str(dest))  # a retry of the same publish
    assert again.files_sent == 0 and again.files_skipped == 2
    with pytest.raises(FileExistsError, match="another manifest"):
        upload_folder(staged(tmp_path, "other", {"run": 2}), str(dest))


def test_an_unfinished_local_folder_is_replaced(tmp_path):
    dest = tmp_path / "out" / "run-1"
    (dest / "merged").mkdir(parents=True)
    (dest / "merged" / "model.safetensors").write_bytes(b"half")  # no manifest: never a finished folder
    upload_folder(listed(tmp_path), str(dest))
    assert (dest / "merged" / "model.safetensors").read_bytes() == b"weights"
    assert (dest / "manifest.json").is_file()


def test_a_local_download_checks_every_file_against_the_manifest(tmp_path):
    source = tmp_path / "out" / "run-1"
    upload_folder(listed(tmp_path), str(source))
    manifest = download_folder(str(source), tmp_path / "down")
    assert [e["path"] for e in manifest["files"]] == ["config.json", "merged/model.safetensors"]
    assert (tmp_path / "down" / "manifest.json").is_file()

    (source / "merged" / "model.safetensors").write_bytes(b"weightz")  # a bad disk, a tampered copy
    with pytest.raises(ChecksumMismatchError) as failed:
        download_folder(str(source), tmp_path / "again")
    assert failed.value.problems == ["merged/model.safetensors: sha256 differs from the manifest"]
    assert not (tmp_path / "again" / "manifest.json").exists()  # a failed download never looks complete
    with pytest.raises(StorageNotFoundError, match="no manifest.json"):
        download_folder(str(tmp_path / "out" / "missing"), tmp_path / "none")


def test_reads_lists_and_not_found_locally(tmp_path):
    write_object(str(tmp_path / "a" / "x.json"), b"{}")
    found = read_object(str(tmp_path / "a" / "x.json"))
    assert found.data == b"{}" and len(found.version) == 64
    with pytest.raises(StorageNotFoundError):
        read_object(str(tmp_path / "a" / "missing.json"))
    (tmp_path / "a" / "run-2").mkdir()
    (tmp_path / "a" / "run-1").mkdir()
    (tmp_path / "a" / ".run-3.partial").mkdir()  # an upload being copied: not a child yet
    assert list_children(str(tmp_path / "a")) == ["run-1", "run-2"]
    assert list_children(str(tmp_path / "nowhere")) == []


def client_error(status: int, code: str | None = None, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code or str(status), "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_not_found_is_decided_by_the_error_code_and_status_never_the_message():
    assert is_not_found(client_error(404, "NoSuchKey"))
    assert is_not_found(client_error(404))  # a HEAD: no body, the code is the status
    assert is_not_found(client_error(404, "NoSuchBucket"))
    assert not is_not_found(client_error(403, "AccessDenied", "user/404 may not read key runs/404/manifest.json"))
    assert not is_not_found(client_error(503, "SlowDown", "404 requests per second"))
    assert not is_not_found(FileNotFoundError("404"))


def wrapped_by_transfer_manager(error: Exception) -> Exception:
    try:
        try:
            raise error
        except ClientError as inner:
            raise S3UploadFailedError(f"Failed to upload: {inner}")
    except S3UploadFailedError as outer:
        return outer


def test_only_network_errors_and_5xx_are_transient():
    assert is_transient(client_error(503))
    assert is_transient(wrapped_by_transfer_manager(client_error(500)))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_transient(client_error(403))
    assert not is_transient(wrapped_by_transfer_manager(client_error(404)))
    assert not is_transient(ValueError("bad config"))


@pytest.mark.integration
def test_s3_upload_and_download_at_the_bucket_root(bucket, tmp_path):
    upload_folder(staged(tmp_path), f"s3://{bucket}")
    local = tmp_path / "down"
    assert download_folder(f"s3://{bucket}", local) == {"run": 1}
    assert (local / "merged" / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((local / "manifest.json").read_text()) == {"run": 1}


@pytest.mark.integration
def test_s3_reads_lists_and_not_found(empty_bucket, proxy):
    import boto3

    s3 = boto3.client("s3")
    for key in ("models/runs/r2/manifest.json", "models/runs/r1/a/b.bin", "models/latest.json", "models/runs/r3"):
        s3.put_object(Bucket=empty_bucket, Key=key, Body=b"{}")
    assert list_children(f"s3://{empty_bucket}/models/runs") == ["r1", "r2"]
    assert list_children(f"s3://{empty_bucket}/models/runs/") == ["r1", "r2"]
    assert list_children(f"s3://{empty_bucket}/models") == ["runs"]
    assert list_children(f"s3://{empty_bucket}/nothing") == []

    found = read_object(f"s3://{empty_bucket}/models/latest.json")
    assert found.data == b"{}" and found.version == s3.head_object(Bucket=empty_bucket, Key="models/latest.json")["ETag"]
    with pytest.raises(StorageNotFoundError, match="NoSuchKey"):
        read_object(f"s3://{empty_bucket}/models/runs/404/manifest.json")
    with pytest.raises(StorageNotFoundError, match="NoSuchBucket"):
        read_object("s3://no-such-bucket/x.json")
    proxy.inject("GET", "models/latest.json", 403)  # access denied is not "missing": it propagates
    with pytest.raises(ClientError) as denied:
        read_object(f"s3://{empty_bucket}/models/latest.json")
    assert not isinstance(denied.value, StorageNotFoundError)
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


@pytest.mark.integration
def test_an_etag_is_none_only_for_an_object_that_is_not_there(proxy, empty_bucket):
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket=empty_bucket, Key="data/train.jsonl", Body=b"{}")
    assert etag_of(f"s3://{empty_bucket}/data/train.jsonl") == s3.head_object(
        Bucket=empty_bucket, Key="data/train.jsonl")["ETag"].strip('"')
    assert etag_of(f"s3://{empty_bucket}/data/gone.jsonl") is None
    assert etag_of(f"s3://{empty_bucket}/data/") is None  # a prefix: no object of its own
    assert etag_of("data/train.jsonl") is None  # local
    proxy.inject("HEAD", "data/train.jsonl", 403)  # access denied is no "no ETag": it propagates
    with pytest.raises(ClientError) as denied:
        etag_of(f"s3://{empty_bucket}/data/train.jsonl")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


@pytest.mark.integration
def test_s3_upload_refuses_a_file_changed_since_its_manifest_and_download_detects_corruption(empty_bucket, tmp_path):
    import boto3

    folder = listed(tmp_path)
    (folder / "config.json").write_text('{"changed": true}')
    with pytest.raises(ChecksumMismatchError, match="changed since the manifest"):
        upload_folder(folder, f"s3://{empty_bucket}/runs/r1")

    upload_folder(listed(tmp_path, "good"), f"s3://{empty_bucket}/runs/r2")
    boto3.client("s3").put_object(Bucket=empty_bucket, Key="runs/r2/merged/model.safetensors", Body=b"weightz")
    with pytest.raises(ChecksumMismatchError) as failed:
        download_folder(f"s3://{empty_bucket}/runs/r2", tmp_path / "down")
    assert failed.value.problems == ["merged/model.safetensors: sha256 differs from the manifest"]
    assert not (tmp_path / "down" / "manifest.json").exists()
