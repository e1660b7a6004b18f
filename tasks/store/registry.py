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

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from tasks.store.manifest import sha256_file
from tasks.store.objects import (MANIFEST_NAME, StorageNotFoundError, StoredObject, head_object, is_s3_uri, join_uri,
                                 list_files, read_object, s3_client, safe_local_path, split_s3_uri,
                                 write_if_unchanged, write_object)

RUNS, LATEST, HISTORY = "runs", "latest.json", "history"
POINTER_SCHEMA = 1
PROMOTE_ATTEMPTS = 5  # conditional-write conflicts tolerated before giving up (another promote keeps winning)


class PromotionError(RuntimeError):
    """The pointer was not moved: the target run is incomplete, or other promotes kept racing."""


def run_uri(output: str, run_id: str) -> str:
    return join_uri(output, RUNS, run_id)


def _read(uri: str) -> StoredObject | None:
    """`read_object`, with None for a missing object (a run not published, no pointer yet)."""
    try:
        return read_object(uri)
    except StorageNotFoundError:
        return None


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
    """Files the manifest lists that are absent or differ from it: in size or sha256 (local files are
    hashed; S3 objects must carry the sha256 the upload recorded, which S3's own SHA-256 checksum held
    to the bytes: no download)."""
    base = run_uri(output, run_id)
    problems = []
    if is_s3_uri(output):
        bucket, prefix = split_s3_uri(base)
        client = s3_client()
        for entry in manifest["files"]:
            head = head_object(bucket, f"{prefix}/{entry['path']}", client)
            if head is None or head["ContentLength"] != entry["bytes"] or \
                    head.get("Metadata", {}).get("sha256") != entry["sha256"]:
                problems.append(entry["path"])
        return problems
    for entry in manifest["files"]:  # local: the bytes are at hand, so every file is hashed
        path = safe_local_path(Path(base), entry["path"], f"{base}/{MANIFEST_NAME}")
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
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
            write_object(join_uri(output, HISTORY, f"{previous['promoted_at']}-{previous['run_id']}.json"), current[0])
        pointer = {
            "schema": POINTER_SCHEMA, "run_id": run_id, "run_uri": run_uri(output, run_id),
            "manifest_sha256": manifest_sha256,
            "promoted_at": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ"),
            "decision": decision,
            "previous": {k: previous[k] for k in ("run_id", "promoted_at")} if previous else None,
        }
        if write_if_unchanged(latest_uri, json.dumps(pointer, indent=2).encode(), current[1] if current else None):
            return pointer
    raise PromotionError(f"latest.json kept changing under {PROMOTE_ATTEMPTS} attempts to promote run {run_id}")


def history(output: str) -> list[dict]:
    """Replaced pointers, oldest first."""
    folder = join_uri(output, HISTORY)
    return [json.loads(read_object(join_uri(folder, name)).data) for name in list_files(folder)
            if "/" not in name and name.endswith(".json")]


def resolve_run_id(output: str, run: str) -> str:
    if run != "latest":
        return run
    pointer = read_latest(output)
    if pointer is None:
        raise StorageNotFoundError(f"{join_uri(output, LATEST)}: no run has been promoted yet")
    return pointer["run_id"]


def fetch_run(output: str, run: str, dest: Path, concurrency: int = 8) -> tuple[str, dict]:
    """Download a published run (an id, or 'latest') into `dest`, every file checked against the
    manifest's sha256 (tasks/store/transfer.py `download_folder`); returns (run id, manifest)."""
    from tasks.store.transfer import download_folder

    run_id = resolve_run_id(output, run)
    return run_id, download_folder(run_uri(output, run_id), dest, concurrency)
