"""Training checkpoints in the run's output (a local folder or S3), so another machine can resume.

Layout: `<output>/checkpoints/<run-key>/step-0000050/...` with the checkpoint's `manifest.json`
written last (tasks/storage.publish_folder), so a listing only counts complete checkpoints. The
run key is the Prefect flow run id: a retry of the same flow run finds its own checkpoints. The
manifest's `fingerprint` says which model, data and settings produced it, so `resume: true` in a
new run only continues a run that trained the same thing. Pure: no torch, no Prefect.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tasks.store.objects import (MANIFEST_NAME, download_folder, is_s3_uri, join_uri, publish_folder, read_bytes,
                                 s3_client, split_s3_uri)

CHECKPOINTS = "checkpoints"


def training_fingerprint(**parts) -> str:
    """A short hash of what determines a training run's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_checkpoints_uri(output: str, run_key: str) -> str:
    return join_uri(output, CHECKPOINTS, run_key)


def upload_checkpoint(folder: Path, output: str, run_key: str, keep: int) -> str:
    """Copy a local checkpoint folder to the output, then drop all but the newest `keep` there."""
    uri = publish_folder(folder, join_uri(run_checkpoints_uri(output, run_key), folder.name))
    for old in _complete_steps(run_checkpoints_uri(output, run_key))[:-keep]:
        _remove(join_uri(run_checkpoints_uri(output, run_key), old))
    return uri


def candidate_checkpoints(output: str, run_key: str | None, want_fingerprint: str | None) -> list[str]:
    """Complete checkpoints to continue from, best first: run `run_key`'s own, newest first; then,
    with `want_fingerprint`, those of any run in `output` whose fingerprint matches, newest first."""
    found = []
    if run_key is not None:
        uri = run_checkpoints_uri(output, run_key)
        found += [join_uri(uri, step) for step in reversed(_complete_steps(uri))]
    if want_fingerprint is None:
        return found
    matching = []
    for key in _children(join_uri(output, CHECKPOINTS)):
        for step in _complete_steps(join_uri(output, CHECKPOINTS, key)):
            uri = join_uri(output, CHECKPOINTS, key, step)
            manifest = json.loads(read_bytes(join_uri(uri, MANIFEST_NAME)))
            if manifest.get("state", {}).get("fingerprint") == want_fingerprint and uri not in found:
                matching.append((manifest.get("saved_at", ""), uri))
    return found + [uri for _, uri in sorted(matching, reverse=True)]


def fetch_checkpoint(uri: str, local_dir: Path) -> Path:
    shutil.rmtree(local_dir, ignore_errors=True)
    return download_folder(uri, local_dir)


def _children(uri: str) -> list[str]:
    """Names of the folders directly under `uri`."""
    if not is_s3_uri(uri):
        path = Path(uri)
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if path.is_dir() else []
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    names = []
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    for page in pages:
        names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def _complete_steps(uri: str) -> list[str]:
    """Step folders under `uri` whose manifest exists (it is written last), oldest first."""
    return [name for name in _children(uri) if name.startswith("step-") and _has_manifest(join_uri(uri, name))]


def _has_manifest(uri: str) -> bool:
    if not is_s3_uri(uri):
        return (Path(uri) / MANIFEST_NAME).is_file()
    bucket, key = split_s3_uri(join_uri(uri, MANIFEST_NAME))
    return s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0) > 0


def _remove(uri: str) -> None:
    """Delete a checkpoint folder, manifest first, so a half-deleted one never looks complete."""
    if not is_s3_uri(uri):
        (Path(uri) / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(uri, ignore_errors=True)
        return
    client = s3_client()
    bucket, prefix = split_s3_uri(uri)
    client.delete_object(Bucket=bucket, Key=join_uri(prefix, MANIFEST_NAME))
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
