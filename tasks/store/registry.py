"""The published models under one output (a local folder or s3://bucket/prefix). Pure.

    <output>/runs/<run-id>/...                       one folder per run, manifest.json written last
    <output>/latest.json                             the promoted run, moved only by `promote`
    <output>/history/<promoted_at>-<run-id>.json     every pointer latest.json replaced (rollback)

`promote` moves the pointer only to a run whose manifest exists and whose every listed file is
there with the listed size and sha256, and it moves it with a conditional write (S3 If-Match /
If-None-Match; a lock file locally), so two runs promoted at once can neither point `latest` at an
incomplete run nor lose the previous pointer from the history.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from tasks.store.objects import (MANIFEST_NAME, StorageNotFoundError, is_s3_uri, join_uri, s3_client, safe_local_path,
                                 split_s3_uri)

RUNS, LATEST, HISTORY = "runs", "latest.json", "history"
POINTER_SCHEMA = 1
PROMOTE_ATTEMPTS = 5  # conditional-write conflicts tolerated before giving up (another promote keeps winning)


class PromotionError(RuntimeError):
    """The pointer was not moved: the target run is incomplete, or other promotes kept racing."""


def run_uri(output: str, run_id: str) -> str:
    return join_uri(output, RUNS, run_id)


def _read(uri: str) -> tuple[bytes, str] | None:
    """(content, version) of a small object or file; the version is what a conditional write compares."""
    if is_s3_uri(uri):
        from tasks.store.transfer import read_object

        return read_object(uri)
    path = Path(uri)
    if not path.is_file():
        return None
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of its own: two writers of the same file must not share a half-written one.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False) as partial:
        partial.write(data)
    os.replace(partial.name, path)  # readers see the old or the new file, never half of one


def _write_if_unchanged(uri: str, data: bytes, version: str | None) -> bool:
    """Write `data` only if the object is still at `version` (None: still absent). False on conflict."""
    if is_s3_uri(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json", **condition)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        current = _read(uri)
        if (current[1] if current else None) != version:
            return False
        _write_local(path, data)
    return True


def _write(uri: str, data: bytes) -> None:
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json")
    else:
        _write_local(Path(uri), data)


def read_run_manifest(output: str, run_id: str) -> dict:
    found = _read(join_uri(run_uri(output, run_id), MANIFEST_NAME))
    if found is None:
        raise StorageNotFoundError(f"{run_uri(output, run_id)}: no {MANIFEST_NAME} "
                                   "(the run does not exist or its publish did not finish)")
    return json.loads(found[0])


def read_latest(output: str) -> dict | None:
    found = _read(join_uri(output, LATEST))
    return json.loads(found[0]) if found else None


def missing_files(output: str, run_id: str, manifest: dict) -> list[str]:
    """Files the manifest lists that are absent or differ in size / recorded sha256 (cheap: no download)."""
    base = run_uri(output, run_id)
    problems = []
    if is_s3_uri(output):
        from tasks.store.transfer import _head

        bucket, prefix = split_s3_uri(base)
        client = s3_client()
        for entry in manifest["files"]:
            head = _head(client, bucket, f"{prefix}/{entry['path']}")
            if head is None or head["ContentLength"] != entry["bytes"] or \
                    head.get("Metadata", {}).get("sha256") != entry["sha256"]:
                problems.append(entry["path"])
        return problems
    for entry in manifest["files"]:
        path = safe_local_path(Path(base), entry["path"], f"{base}/{MANIFEST_NAME}")
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            problems.append(entry["path"])
    return problems


def promote(output: str, run_id: str, decision: dict) -> dict:
    """Point `<output>/latest.json` at a complete published run; the replaced pointer goes to history."""
    manifest = read_run_manifest(output, run_id)
    if problems := missing_files(output, run_id, manifest):
        raise PromotionError(f"run {run_id} is incomplete, latest.json not moved: {', '.join(problems)} "
                             "missing or different")
    manifest_sha256 = hashlib.sha256(_read(join_uri(run_uri(output, run_id), MANIFEST_NAME))[0]).hexdigest()
    latest_uri = join_uri(output, LATEST)
    for _ in range(PROMOTE_ATTEMPTS):
        current = _read(latest_uri)
        previous = json.loads(current[0]) if current else None
        if previous and previous["run_id"] == run_id:
            return previous  # already latest: promoting again changes nothing
        if previous:  # keep the pointer being replaced, so a rollback can restore it
            _write(join_uri(output, HISTORY, f"{previous['promoted_at']}-{previous['run_id']}.json"), current[0])
        pointer = {
            "schema": POINTER_SCHEMA, "run_id": run_id, "run_uri": run_uri(output, run_id),
            "manifest_sha256": manifest_sha256,
            "promoted_at": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ"),
            "decision": decision,
            "previous": {k: previous[k] for k in ("run_id", "promoted_at")} if previous else None,
        }
        if _write_if_unchanged(latest_uri, json.dumps(pointer, indent=2).encode(), current[1] if current else None):
            return pointer
    raise PromotionError(f"latest.json kept changing under {PROMOTE_ATTEMPTS} attempts to promote run {run_id}")


def history(output: str) -> list[dict]:
    """Replaced pointers, oldest first."""
    if is_s3_uri(output):
        bucket, prefix = split_s3_uri(join_uri(output, HISTORY))
        client = s3_client()
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
                for o in page.get("Contents", [])]
        return [json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in sorted(keys)]
    folder = Path(output, HISTORY)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def resolve_run_id(output: str, run: str) -> str:
    if run != "latest":
        return run
    pointer = read_latest(output)
    if pointer is None:
        raise StorageNotFoundError(f"{join_uri(output, LATEST)}: no run has been promoted yet")
    return pointer["run_id"]


def fetch_run(output: str, run: str, dest: Path, concurrency: int = 8) -> tuple[str, dict]:
    """Download a published run (an id, or 'latest') into `dest`; returns (run id, manifest)."""
    run_id = resolve_run_id(output, run)
    if is_s3_uri(output):
        from tasks.store.transfer import download_run_folder

        return run_id, download_run_folder(run_uri(output, run_id), dest, concurrency)
    manifest = read_run_manifest(output, run_id)
    source = Path(run_uri(output, run_id))
    listed = f"{source}/{MANIFEST_NAME}"  # its paths are data: checked on both sides before copying any
    pairs = [(safe_local_path(source, e["path"], listed), safe_local_path(dest, e["path"], listed))
             for e in [*manifest["files"], {"path": MANIFEST_NAME}]]
    for origin, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target)
    return run_id, manifest
