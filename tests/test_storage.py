import json

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError

from tasks.store.objects import download_folder, is_transient, publish_folder


def staged(tmp_path, name="stage", manifest=None):
    folder = tmp_path / name
    (folder / "merged").mkdir(parents=True, exist_ok=True)
    (folder / "merged" / "model.safetensors").write_bytes(b"weights")
    (folder / "manifest.json").write_text(json.dumps(manifest or {"run": 1}))
    return folder


def test_local_publish_is_atomic_and_idempotent(tmp_path):
    dest = tmp_path / "out" / "run-1"
    assert publish_folder(staged(tmp_path), str(dest)) == str(dest)
    assert (dest / "merged" / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in dest.parent.iterdir()] == ["run-1"]  # no .partial left behind
    assert publish_folder(staged(tmp_path), str(dest)) == str(dest)  # a retry of the same publish
    with pytest.raises(FileExistsError, match="another manifest"):
        publish_folder(staged(tmp_path, "other", {"run": 2}), str(dest))


def client_error(status: int) -> ClientError:
    return ClientError({"Error": {"Code": str(status)}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


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
def test_s3_publish_and_download_at_the_bucket_root(bucket, tmp_path):
    publish_folder(staged(tmp_path), f"s3://{bucket}")
    local = download_folder(f"s3://{bucket}", tmp_path / "down")
    assert (local / "merged" / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((local / "manifest.json").read_text()) == {"run": 1}
