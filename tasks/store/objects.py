"""Object storage: a local folder or S3 (boto3), behind the same few calls.

S3 honours the usual boto3 settings, including `AWS_ENDPOINT_URL` for S3-compatible stores.
boto3 is imported lazily so the pure modules stay light. Transient S3 errors are retried by
botocore's standard retry mode (idempotent single-object calls only).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

MANIFEST_NAME = "manifest.json"  # written last: its presence means the run folder is complete


class StorageNotFoundError(FileNotFoundError):
    """The object or file does not exist (a user error, never retried)."""


class UnsafeKeyError(ValueError):
    """A remote key (or a path read from remote data) that must not become a local path."""


# Below common filesystem limits (PATH_MAX 4096, NAME_MAX 255) and at S3's own key limit (1024 bytes).
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255


def key_problem(key: str) -> str | None:
    """Why `key` cannot be used as a relative local path, or None when it can.

    Keys are data written by whoever can upload: '..' would climb out of the destination, a leading
    '/' would replace it, a backslash is a separator on Windows, and control characters (NUL, newline,
    bell) break file names, logs and anything that prints them.
    """
    if not key:
        return "is empty"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"is {len(key.encode('utf-8', 'surrogatepass'))} bytes long (at most {MAX_KEY_BYTES})"
    if controls := sorted({f"{ord(c):#04x}" for c in key if ord(c) < 32 or 127 <= ord(c) < 160}):
        return f"contains control characters ({', '.join(controls)})"
    if "\\" in key:
        return "contains a backslash (a path separator on Windows)"
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        return "is an absolute path"
    segments = key.split("/")
    if ".." in segments:
        return "has a '..' segment (it would leave the destination folder)"
    if long := [s for s in segments if len(s.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES]:
        return f"has a {len(long[0].encode('utf-8', 'surrogatepass'))}-byte name (at most {MAX_SEGMENT_BYTES} per part)"
    return None


def safe_local_path(root: Path, relative: str, source: str = "") -> Path:
    """`root / relative`, refused (UnsafeKeyError naming the key and why) unless it stays inside root.

    `source` names where `relative` came from (a bucket prefix, a manifest) for the error message.
    """
    problem = key_problem(relative)
    target = Path(root, relative)
    if problem is None and not target.resolve().is_relative_to(Path(root).resolve()):
        problem = "leads outside the destination folder (through a symbolic link)"
    if problem:
        where = f" (from {source})" if source else ""
        raise UnsafeKeyError(f"key {relative!r}{where} {problem}: refusing to write it under {root}. "
                             "Rename or delete that object; keys are taken as data, never as paths to follow.")
    return target


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def join_uri(base: str, *parts: str) -> str:
    if is_s3_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def s3_client(max_pool_connections: int = 10):
    import boto3
    from botocore.config import Config

    # Standard mode retries only what is safe and transient: connection errors, 5xx, throttling.
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5},
                                            max_pool_connections=max_pool_connections))


def is_transient(error: BaseException) -> bool:
    """A network failure or a 5xx from the store, anywhere in the exception's chain.

    boto3's transfer manager wraps the real error (S3UploadFailedError from ClientError), so the
    chain is walked rather than the outer type checked.
    """
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
            return True
        if isinstance(error, ClientError):
            return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
        error = error.__cause__ or error.__context__
    return False



def retry_if_transient(task, task_run, state) -> bool:
    """A Prefect `retry_condition_fn`: retry only when the store or network hiccuped, never on a
    user error (a missing object, a changed file, bad data)."""
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False

def read_bytes(uri: str) -> bytes:
    if not is_s3_uri(uri):
        path = Path(uri)
        if not path.is_file():
            raise StorageNotFoundError(f"{uri}: file not found (working directory {Path.cwd()})")
        return path.read_bytes()
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise StorageNotFoundError(f"{uri}: {code} (check the bucket and key)") from error
        raise


def publish_folder(local_dir: Path, dest_uri: str) -> str:
    """Copy a finished run folder to `dest_uri` so readers never see half of it.

    Local: copy to a hidden sibling, then rename (atomic on one filesystem).
    S3: upload every file, `manifest.json` last; a run without a manifest is incomplete.
    """
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not is_s3_uri(dest_uri):
        dest = Path(dest_uri)
        if dest.exists():
            if _same_manifest(dest, local_dir):
                return str(dest)  # an earlier attempt of this publish finished: nothing to do
            raise FileExistsError(f"{dest} already exists with another manifest; refusing to overwrite")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(local_dir, partial)
        os.replace(partial, dest)
        return str(dest)
    from boto3.s3.transfer import TransferConfig

    client = s3_client()
    bucket, prefix = split_s3_uri(dest_uri)
    transfer = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20)
    files.sort(key=lambda p: p.name == MANIFEST_NAME)  # manifest last
    for path in files:
        key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local_dir).as_posix()]))
        client.upload_file(str(path), bucket, key, Config=transfer)
    return dest_uri


def _same_manifest(published: Path, staged: Path) -> bool:
    done = published / MANIFEST_NAME
    return done.is_file() and done.read_bytes() == (staged / MANIFEST_NAME).read_bytes()


def download_folder(uri: str, local_dir: Path) -> Path:
    """Fetch a published run folder (local or S3) into `local_dir`."""
    local_dir.mkdir(parents=True, exist_ok=True)
    if not is_s3_uri(uri):
        shutil.copytree(uri, local_dir, dirs_exist_ok=True)
        return local_dir
    client = s3_client()
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])]
    if not keys:
        raise StorageNotFoundError(f"{uri}: no objects under this prefix")
    # Every key is checked before the first byte is written: a bad key fails the download, not half of it.
    targets = {key: safe_local_path(local_dir, key[len(prefix):], uri) for key in keys if not key.endswith("/")}
    for key, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return local_dir
