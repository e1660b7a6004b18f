"""Object storage: a local folder or S3 (boto3), behind the same few calls.

URIs and keys (`join_uri`, `safe_local_path`), the S3 client and what counts as transient, and
small objects: `read_object` (bytes and version; StorageNotFoundError when missing), `write_object`,
`write_if_unchanged` (conditional write), `exists`, `list_children`, `list_files`, `remove_folder`.
Whole folders go up and down through tasks/store/transfer.py (`upload_folder`, `download_folder`).

S3 honours the usual boto3 settings, including `AWS_ENDPOINT_URL` for S3-compatible stores.
boto3 is imported lazily so the pure modules stay light. Transient S3 errors are retried by
botocore's standard retry mode (idempotent single-object calls only).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

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


NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})


def is_not_found(error: BaseException) -> bool:
    """S3 said the object (or bucket) does not exist: decided from the error code and the HTTP status
    of the response, never from the message text (a 403 or a 5xx whose message mentions 404 is not)."""
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    # HEAD answers carry no body, so botocore sets the code to the status ("404").
    return (error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
            or error.response.get("Error", {}).get("Code") in NOT_FOUND_CODES)


class StoredObject(NamedTuple):
    data: bytes
    version: str  # S3: the ETag; local: the sha256 of the content. What a conditional write compares.


def read_object(uri: str) -> StoredObject:
    """A small object or file, whole, with its version. StorageNotFoundError when it does not exist;
    any other error (access denied, network, 5xx after botocore's retries) propagates."""
    if not is_s3_uri(uri):
        path = Path(uri)
        if not path.is_file():
            raise StorageNotFoundError(f"{uri}: file not found (working directory {Path.cwd()})")
        data = path.read_bytes()
        return StoredObject(data, hashlib.sha256(data).hexdigest())
    bucket, key = split_s3_uri(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except Exception as error:
        if is_not_found(error):
            code = error.response.get("Error", {}).get("Code", "404")
            raise StorageNotFoundError(f"{uri}: {code} (check the bucket and key)") from error
        raise
    return StoredObject(response["Body"].read(), response["ETag"])


def head_object(bucket: str, key: str, client=None) -> dict | None:
    """The object's HEAD (size, metadata, S3's SHA-256 checksum), or None when S3 says it is not there;
    any other error (access denied, a 5xx after botocore's retries) propagates."""
    try:
        return (client or s3_client()).head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception as error:
        if is_not_found(error):
            return None
        raise


def exists(uri: str) -> bool:
    """Whether the object or file is there."""
    return head_object(*split_s3_uri(uri)) is not None if is_s3_uri(uri) else Path(uri).is_file()


def etag_of(uri: str) -> str | None:
    """The S3 object's ETag; None for a local path, or an object that is not there (gone, or a prefix)."""
    found = head_object(*split_s3_uri(uri)) if is_s3_uri(uri) else None
    return found["ETag"].strip('"') if found else None


def browser_url(uri: str, expires_s: int) -> str | None:
    """A URL a person's browser can open: a presigned GET (SigV4, valid `expires_s`) for an S3 object; a
    file:// URL for a local file (readable on that machine only). None for S3 under temporary credentials:
    their session token would be written into the URL, and the URL into wherever it is shown."""
    if not is_s3_uri(uri):
        return Path(uri).resolve().as_uri()
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None or credentials.get_frozen_credentials().token:
        return None
    bucket, key = split_s3_uri(uri)
    client = session.client("s3", config=Config(signature_version="s3v4"))  # SigV2 URLs: refused by newer regions
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)


def write_object(uri: str, data: bytes, content_type: str = "application/json") -> None:
    """Write a small object whole: readers see the old or the new content, never half of it."""
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
    else:
        _write_local(Path(uri), data)


def write_if_unchanged(uri: str, data: bytes, version: str | None,
                       content_type: str = "application/json") -> bool:
    """Write `data` only if the object is still at `version` (as `read_object` returned it; None: still
    absent). False on a conflict: someone else wrote it since. S3: If-Match / If-None-Match; local: a
    lock file around compare-and-rename."""
    if is_s3_uri(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, **condition)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            current = read_object(uri).version
        except StorageNotFoundError:
            current = None
        if current != version:
            return False
        _write_local(path, data)
    return True


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of its own: two writers of the same file must not share a half-written one.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False) as partial:
        partial.write(data)
    os.replace(partial.name, path)  # readers see the old or the new file, never half of one


def _prefix(uri: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/', or '' at the bucket root)."""
    bucket, prefix = split_s3_uri(uri)
    return bucket, prefix.rstrip("/") + "/" if prefix.strip("/") else ""


def list_children(uri: str) -> list[str]:
    """Names of the "folders" directly under `uri`, sorted; hidden local ones (a `.x.partial` being
    copied) are left out. Empty when `uri` does not exist."""
    if not is_s3_uri(uri):
        path = Path(uri)
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if path.is_dir() else []
    bucket, prefix = _prefix(uri)
    names = []
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    for page in pages:
        names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def list_files(uri: str) -> list[str]:
    """Every file under a folder or prefix, as paths relative to it ('/'-separated), sorted.

    These are remote data: pass each through `safe_local_path` before using it as a path."""
    if not is_s3_uri(uri):
        root = Path(uri)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) \
            if root.is_dir() else []
    bucket, prefix = _prefix(uri)
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])
                  if not o["Key"].endswith("/"))  # "folder" marker objects hold nothing


def remove_folder(uri: str) -> None:
    """Delete a folder or prefix, its manifest first, so a half-deleted one never looks complete."""
    if not is_s3_uri(uri):
        (Path(uri) / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(uri, ignore_errors=True)
        return
    client = s3_client()
    bucket, prefix = _prefix(uri)
    client.delete_object(Bucket=bucket, Key=prefix + MANIFEST_NAME)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
