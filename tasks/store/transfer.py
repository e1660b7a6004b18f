"""Folders up and down: the one uploader (`upload_folder`) and the one downloader (`download_folder`)
for published runs and training checkpoints, to and from a local folder or S3.

A folder is complete once its `manifest.json` is there (uploaded last; its "files" list each file's
path, size and sha256). Local output: the folder is copied to a hidden sibling and renamed, so it
appears whole. S3: every object is sent with `ChecksumAlgorithm=SHA256` (S3 checks each request's body against it)
and its whole-file sha256 in the object metadata; after the upload the checksum S3 computed from
what it received (full-object for one request, composite over the parts for multipart) is read
back and compared with the local file's. That read-back is also what makes a re-publish cheap: an
object whose size, metadata sha256 and S3 checksum all match the local file is not sent again.
Transient errors (network, 5xx) are retried by botocore per request; a multipart upload that
still fails is aborted by boto3's transfer manager, so no partial object is ever visible.

Downloads check every remote key (and every path the manifest names) with `safe_local_path` before
the first byte is written, then every file the manifest lists against its sha256; the manifest is
written last there too. Pure: boto3 is imported lazily.
"""
from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tasks.store.manifest import file_problems
from tasks.store.objects import (MANIFEST_NAME, StorageNotFoundError, head_object, is_s3_uri, join_uri, list_files,
                                 read_object, s3_client, safe_local_path, split_s3_uri)

CONTENT_TYPES = {".safetensors": "application/octet-stream", ".json": "application/json",
                 ".md": "text/markdown; charset=utf-8", ".jinja": "text/plain; charset=utf-8",
                 ".txt": "text/plain; charset=utf-8", ".model": "application/octet-stream"}


class ChecksumMismatchError(RuntimeError):
    """Bytes differ from their checksum: what S3 stored is not what was sent (the object is deleted
    and the upload fails), a local file changed since its manifest was written, or a downloaded file
    does not match the manifest (`problems` lists which)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


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


def _stored_matches(head: dict | None, size: int, sha256_hex: str, s3_checksum: str) -> bool:
    if head is None:
        return False
    stored = (head.get("ChecksumSHA256") or "").split("-")[0]
    return (head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256_hex
            and stored == s3_checksum)


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

    def upload_file(self, path: Path, relative: str, expected_sha256: str | None) -> bool:
        """Send `path` unless an identical object is already there; True when bytes were sent.
        `expected_sha256`: the manifest's, checked against the file first (None: not listed)."""
        key = _key(self.prefix, relative)
        sha256_hex, s3_checksum = local_checksums(path, self.part_bytes)
        if expected_sha256 is not None and sha256_hex != expected_sha256:
            raise ChecksumMismatchError(f"{path}: changed since the manifest was written (sha256 {sha256_hex})")
        size = path.stat().st_size
        if _stored_matches(head_object(self.bucket, key, self.client), size, sha256_hex, s3_checksum):
            return False
        self.client.upload_file(str(path), self.bucket, key, Config=self.transfer, ExtraArgs={
            "ChecksumAlgorithm": "SHA256", "ContentType": content_type(relative), "Metadata": {"sha256": sha256_hex}})
        head = head_object(self.bucket, key, self.client)
        if not _stored_matches(head, size, sha256_hex, s3_checksum):
            self.client.delete_object(Bucket=self.bucket, Key=key)  # never leave a corrupt object behind
            raise ChecksumMismatchError(f"s3://{self.bucket}/{key}: S3 stored checksum "
                                        f"{(head or {}).get('ChecksumSHA256')}, expected {s3_checksum}")
        return True

    def upload_entries(self, folder: Path, entries: list[dict]) -> TransferStats:
        stats = TransferStats()
        # Files in parallel (few large shards and many small files), parts of each file in parallel too.
        with ThreadPoolExecutor(max_workers=min(4, self.concurrency)) as pool:
            sent = list(pool.map(lambda e: self.upload_file(folder / e["path"], e["path"], e.get("sha256")), entries))
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


def upload_folder(local_dir: Path, dest_uri: str, part_bytes: int = 64 * 2**20,
                  concurrency: int = 8) -> TransferStats:
    """Publish a finished folder (a run, a checkpoint) to `dest_uri` so readers never see half of it.

    `local_dir` must hold its `manifest.json`. Every file goes up, the manifest last. Local: copied to
    a hidden sibling, then renamed (atomic on one filesystem). S3: checksummed, verified, multipart
    above `part_bytes`, files and parts in parallel; a file the manifest lists must still have the
    listed sha256. Idempotent: when the same manifest is already there nothing is sent again (S3:
    only what is missing or different); a destination with another manifest is refused
    (FileExistsError). A destination without a manifest is an unfinished upload and is replaced.
    """
    manifest_path = local_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{local_dir}: no {MANIFEST_NAME}; a folder is uploaded with its manifest")
    manifest_bytes = manifest_path.read_bytes()
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
                   if p.is_file() and p != manifest_path)
    listed = {e["path"]: e for e in json.loads(manifest_bytes).get("files", [])}
    if missing := sorted(set(listed) - set(files)):
        raise FileNotFoundError(f"{local_dir}: its manifest lists {', '.join(missing[:5])}, which are not there")
    entries = [listed.get(r) or {"path": r, "bytes": (local_dir / r).stat().st_size} for r in files]
    if is_s3_uri(dest_uri):
        return _upload_s3(local_dir, dest_uri, entries, manifest_bytes, part_bytes, concurrency)
    return _upload_local(local_dir, Path(dest_uri), entries, manifest_bytes)


def _published_manifest(uri: str) -> bytes | None:
    try:
        return read_object(join_uri(uri, MANIFEST_NAME)).data
    except StorageNotFoundError:
        return None


def _refuse_other(uri: str, published: bytes | None, manifest_bytes: bytes) -> None:
    if published is not None and published != manifest_bytes:
        raise FileExistsError(f"{join_uri(uri, MANIFEST_NAME)} already exists with another manifest; "
                              "refusing to overwrite")


def _upload_local(local_dir: Path, dest: Path, entries: list[dict], manifest_bytes: bytes) -> TransferStats:
    stats = TransferStats()
    published = _published_manifest(str(dest))
    if published == manifest_bytes:  # an earlier attempt of this upload finished: nothing to do
        for entry in entries:
            stats.add(False, entry["bytes"])
        stats.add(False, len(manifest_bytes))
        return stats
    _refuse_other(str(dest), published, manifest_bytes)
    if dest.exists():  # no manifest: what an interrupted delete left; never a finished folder
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling of its own (two uploads of the same folder must not share one), then a rename.
    partial = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        shutil.copytree(local_dir, partial, dirs_exist_ok=True)
        try:
            os.replace(partial, dest)
        except OSError:  # another upload renamed its copy into place first
            published = _published_manifest(str(dest))
            _refuse_other(str(dest), published, manifest_bytes)
            if published is None:
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for entry in entries:
        stats.add(True, entry["bytes"])
    stats.add(True, len(manifest_bytes))
    return stats


def _upload_s3(local_dir: Path, dest_uri: str, entries: list[dict], manifest_bytes: bytes, part_bytes: int,
               concurrency: int) -> TransferStats:
    published = _published_manifest(dest_uri)
    _refuse_other(dest_uri, published, manifest_bytes)
    uploader = FolderUploader(dest_uri, part_bytes, concurrency)
    stats = uploader.upload_entries(local_dir, entries)
    if published is None and uploader.put_manifest(manifest_bytes):
        stats.add(True, len(manifest_bytes))
    else:
        stats.add(False, len(manifest_bytes))
    if _published_manifest(dest_uri) != manifest_bytes:  # a concurrent upload to the same folder won
        raise FileExistsError(f"{join_uri(dest_uri, MANIFEST_NAME)} was written by another upload with another "
                              "manifest")
    return stats


def download_folder(uri: str, local_dir: Path, concurrency: int = 8, only: set[str] | None = None) -> dict:
    """Fetch a complete folder (a published run, a checkpoint) from a local folder or S3 into
    `local_dir`; returns its manifest. `only`: just these files (paths relative to `uri`), each still
    checked against the manifest.

    Every file under `uri` comes down. Every remote key, and every path the manifest lists, is
    checked with `safe_local_path` before anything is written (UnsafeKeyError). Every file the
    manifest lists must be there and match its sha256 (ChecksumMismatchError naming each problem);
    `manifest.json` is written last, so a failed download never looks complete.
    """
    manifest_uri = join_uri(uri, MANIFEST_NAME)
    try:
        manifest_bytes = read_object(manifest_uri).data
    except StorageNotFoundError as error:
        raise StorageNotFoundError(f"{uri}: no {MANIFEST_NAME} (it does not exist or its upload did not "
                                   "finish)") from error
    manifest = json.loads(manifest_bytes)
    entries = [e for e in manifest.get("files", []) if only is None or e["path"] in only]
    local_source = None if is_s3_uri(uri) else Path(uri)
    # Keys and the manifest's paths are remote data: all checked before the first byte is written.
    for entry in entries:
        safe_local_path(local_dir, entry["path"], manifest_uri)
        if local_source is not None:
            safe_local_path(local_source, entry["path"], manifest_uri)
    relatives = [r for r in list_files(uri) if r != MANIFEST_NAME and (only is None or r in only)]
    pairs = [(safe_local_path(local_source, r, uri) if local_source is not None else r,
              safe_local_path(local_dir, r, uri)) for r in relatives]
    if missing := sorted({e["path"] for e in entries} - set(relatives)):
        problems = [f"{path}: missing" for path in missing]
        raise ChecksumMismatchError(f"{uri}: files its manifest lists are missing: {', '.join(missing[:5])}", problems)

    if local_source is None:
        bucket, prefix = split_s3_uri(uri)
        client = s3_client(max_pool_connections=4 * concurrency)

        def fetch(pair: tuple[str, Path]) -> None:
            pair[1].parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, _key(prefix, pair[0]), str(pair[1]))
    else:
        def fetch(pair: tuple[Path, Path]) -> None:
            pair[1].parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pair[0], pair[1])

    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / MANIFEST_NAME).unlink(missing_ok=True)  # an earlier download's: this one is not complete yet
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(fetch, pairs))
    with ThreadPoolExecutor(max_workers=min(4, concurrency)) as pool:  # hashing releases the GIL
        problems = [p for found in pool.map(lambda e: file_problems(local_dir, [e]), entries) for p in found]
    if problems:
        raise ChecksumMismatchError(f"{uri}: downloaded files differ from its manifest: " + "; ".join(problems[:5]),
                                    problems)
    (local_dir / MANIFEST_NAME).write_bytes(manifest_bytes)
    return manifest
