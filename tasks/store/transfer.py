"""Run folders to and from S3: checksummed, concurrent, resumable uploads and verified downloads.

Every object is sent with `ChecksumAlgorithm=SHA256` (S3 checks each request's body against it)
and its whole-file sha256 in the object metadata; after the upload the checksum S3 computed from
what it received (full-object for one request, composite over the parts for multipart) is read
back and compared with the local file's. That read-back is also what makes a re-publish cheap: an
object whose size, metadata sha256 and S3 checksum all match the local file is not sent again.
Transient errors (network, 5xx) are retried by botocore per request; a multipart upload that
still fails is aborted by boto3's transfer manager, so no partial object is ever visible.
Pure: boto3 is imported lazily.
"""
from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tasks.store.objects import MANIFEST_NAME, StorageNotFoundError, s3_client, safe_local_path, split_s3_uri

READ_BLOCK = 8 * 2**20
CONTENT_TYPES = {".safetensors": "application/octet-stream", ".json": "application/json",
                 ".md": "text/markdown; charset=utf-8", ".jinja": "text/plain; charset=utf-8",
                 ".txt": "text/plain; charset=utf-8", ".model": "application/octet-stream"}


class ChecksumMismatchError(RuntimeError):
    """What S3 stored is not what was sent: the object is deleted and the publish fails."""


@dataclass
class TransferStats:
    files_sent: int = 0
    bytes_sent: int = 0
    files_skipped: int = 0  # already in the bucket with the same checksum
    bytes_skipped: int = 0

    def add(self, sent: bool, size: int) -> None:
        if sent:
            self.files_sent, self.bytes_sent = self.files_sent + 1, self.bytes_sent + size
        else:
            self.files_skipped, self.bytes_skipped = self.files_skipped + 1, self.bytes_skipped + size


def content_type(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def local_checksums(path: Path, part_size: int) -> tuple[str, str]:
    """(sha256 hex of the file, the SHA256 checksum S3 reports for it uploaded with `part_size` parts).

    One request (smaller than a part): base64 of the sha256. Multipart: S3's composite checksum,
    the sha256 of the parts' sha256 digests concatenated (some servers append '-<parts>').
    """
    whole, parts = hashlib.sha256(), []
    with open(path, "rb") as handle:
        while part := handle.read(part_size):
            whole.update(part)
            parts.append(hashlib.sha256(part).digest())
    if path.stat().st_size < part_size:
        return whole.hexdigest(), base64.b64encode(whole.digest()).decode()
    return whole.hexdigest(), base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()


def _key(prefix: str, relative: str) -> str:
    return "/".join(filter(None, [prefix.strip("/"), relative]))


def _head(client, bucket: str, key: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as error:
        if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise


def _stored_matches(head: dict | None, size: int, sha256_hex: str, s3_checksum: str) -> bool:
    if head is None:
        return False
    stored = (head.get("ChecksumSHA256") or "").split("-")[0]
    return (head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256_hex
            and stored == s3_checksum)


def read_object(uri: str) -> tuple[bytes, str] | None:
    """(body, ETag) of an object, or None when it does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return response["Body"].read(), response["ETag"]


class FolderUploader:
    """Uploads one run folder's files to s3://bucket/prefix; safe to run again after any failure."""

    def __init__(self, dest_uri: str, part_bytes: int = 64 * 2**20, concurrency: int = 8):
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = split_s3_uri(dest_uri)
        self.part_bytes = part_bytes
        self.concurrency = concurrency
        self.client = s3_client(max_pool_connections=4 * concurrency)
        self.transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes,
                                       max_concurrency=concurrency)

    def upload_file(self, path: Path, relative: str, expected_sha256: str) -> bool:
        """Send `path` unless an identical object is already there; True when bytes were sent."""
        key = _key(self.prefix, relative)
        sha256_hex, s3_checksum = local_checksums(path, self.part_bytes)
        if sha256_hex != expected_sha256:
            raise ChecksumMismatchError(f"{path}: changed since the manifest was written (sha256 {sha256_hex})")
        size = path.stat().st_size
        if _stored_matches(_head(self.client, self.bucket, key), size, sha256_hex, s3_checksum):
            return False
        self.client.upload_file(str(path), self.bucket, key, Config=self.transfer, ExtraArgs={
            "ChecksumAlgorithm": "SHA256", "ContentType": content_type(relative), "Metadata": {"sha256": sha256_hex}})
        head = _head(self.client, self.bucket, key)
        if not _stored_matches(head, size, sha256_hex, s3_checksum):
            self.client.delete_object(Bucket=self.bucket, Key=key)  # never leave a corrupt object behind
            raise ChecksumMismatchError(f"s3://{self.bucket}/{key}: S3 stored checksum "
                                        f"{(head or {}).get('ChecksumSHA256')}, expected {s3_checksum}")
        return True

    def upload_entries(self, folder: Path, entries: list[dict]) -> TransferStats:
        stats = TransferStats()
        # Files in parallel (few large shards and many small files), parts of each file in parallel too.
        with ThreadPoolExecutor(max_workers=min(4, self.concurrency)) as pool:
            sent = list(pool.map(lambda e: self.upload_file(folder / e["path"], e["path"], e["sha256"]), entries))
        for entry, was_sent in zip(entries, sent):
            stats.add(was_sent, entry["bytes"])
        return stats

    def put_manifest(self, manifest_bytes: bytes) -> bool:
        """Write manifest.json once: its presence says the run is complete. True when it was written."""
        from botocore.exceptions import ClientError

        digest = base64.b64encode(hashlib.sha256(manifest_bytes).digest()).decode()
        key = _key(self.prefix, MANIFEST_NAME)
        try:
            # If-None-Match: a run's manifest is written once, never replaced by another one.
            self.client.put_object(Bucket=self.bucket, Key=key, Body=manifest_bytes, IfNoneMatch="*",
                                   ChecksumAlgorithm="SHA256", ChecksumSHA256=digest,
                                   ContentType="application/json")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            return False  # an earlier attempt wrote it; the caller compared contents beforehand
        return True


def upload_run_folder(local_dir: Path, dest_uri: str, part_bytes: int = 64 * 2**20,
                      concurrency: int = 8) -> TransferStats:
    """Publish a staged run folder: every file the manifest lists, then the manifest itself.

    Refuses a destination whose manifest differs (another run's folder); repeats of the same
    publish send only what is missing or different.
    """
    manifest_bytes = (local_dir / MANIFEST_NAME).read_bytes()
    manifest_uri = f"{dest_uri.rstrip('/')}/{MANIFEST_NAME}"
    published = read_object(manifest_uri)
    if published is not None and published[0] != manifest_bytes:
        raise FileExistsError(f"{manifest_uri} already exists with another manifest; refusing to overwrite")
    uploader = FolderUploader(dest_uri, part_bytes, concurrency)
    stats = uploader.upload_entries(local_dir, json.loads(manifest_bytes)["files"])
    if published is None and uploader.put_manifest(manifest_bytes):
        stats.add(True, len(manifest_bytes))
    else:
        stats.add(False, len(manifest_bytes))
    if read_object(manifest_uri)[0] != manifest_bytes:  # a concurrent publish of the same run id won
        raise FileExistsError(f"{manifest_uri} was written by another publish with another manifest")
    return stats


def download_run_folder(run_uri: str, local_dir: Path, concurrency: int = 8) -> dict:
    """Fetch a published run (manifest first, then every file it lists); returns the manifest."""
    found = read_object(f"{run_uri.rstrip('/')}/{MANIFEST_NAME}")
    if found is None:
        raise StorageNotFoundError(f"{run_uri}: no {MANIFEST_NAME} (the run does not exist or is incomplete)")
    manifest = json.loads(found[0])
    bucket, prefix = split_s3_uri(run_uri)
    client = s3_client(max_pool_connections=4 * concurrency)

    # The manifest's paths are remote data too: all checked before anything is written.
    targets = [(entry["path"], safe_local_path(local_dir, entry["path"], f"{run_uri}/{MANIFEST_NAME}"))
               for entry in manifest["files"]]

    def fetch(path_and_target: tuple[str, Path]) -> None:
        path, target = path_and_target
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, _key(prefix, path), str(target))

    local_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(fetch, targets))
    (local_dir / MANIFEST_NAME).write_bytes(found[0])
    return manifest
