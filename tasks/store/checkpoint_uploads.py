"""Training checkpoints in the run's output (a local folder or S3), so another machine can resume.

Layout: `<output>/checkpoints/<run-key>/step-0000050/...`, uploaded and downloaded like a published
run (tasks/store/transfer.py: S3 uploads checksummed and verified, `manifest.json` last; downloads
checked against the manifest's sha256), so a listing only counts complete checkpoints. The
run key is the Prefect flow run id: a retry of the same flow run finds its own checkpoints. The
manifest's `fingerprint` says which model, data and settings produced it, so `resume: true` in a
new run only continues a run that trained the same thing. Pure: no torch, no Prefect.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tasks.store.objects import MANIFEST_NAME, exists, join_uri, list_children, read_object, remove_folder
from tasks.store.transfer import download_folder, upload_folder

CHECKPOINTS = "checkpoints"


def training_fingerprint(**parts) -> str:
    """A short hash of what determines a training run's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_checkpoints_uri(output: str, run_key: str) -> str:
    return join_uri(output, CHECKPOINTS, run_key)


def upload_checkpoint(folder: Path, output: str, run_key: str, keep: int) -> str:
    """Copy a local checkpoint folder to the output, then drop all but the newest `keep` there.

    A step already there with another manifest (a retry that went back to an older checkpoint and
    saved this step again) is replaced: the newer save of a step wins."""
    uri = join_uri(run_checkpoints_uri(output, run_key), folder.name)
    try:
        upload_folder(folder, uri)
    except FileExistsError:
        remove_folder(uri)  # manifest first: never a mix of two saves that looks complete
        upload_folder(folder, uri)
    for old in _complete_steps(run_checkpoints_uri(output, run_key))[:-keep]:
        remove_folder(join_uri(run_checkpoints_uri(output, run_key), old))
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
    for key in list_children(join_uri(output, CHECKPOINTS)):
        for step in _complete_steps(join_uri(output, CHECKPOINTS, key)):
            uri = join_uri(output, CHECKPOINTS, key, step)
            manifest = json.loads(read_object(join_uri(uri, MANIFEST_NAME)).data)
            if manifest.get("state", {}).get("fingerprint") == want_fingerprint and uri not in found:
                matching.append((manifest.get("saved_at", ""), uri))
    return found + [uri for _, uri in sorted(matching, reverse=True)]


def fetch_checkpoint(uri: str, local_dir: Path) -> Path:
    """Download a checkpoint into `local_dir` (emptied first); ChecksumMismatchError when a file
    does not match the checkpoint's manifest."""
    shutil.rmtree(local_dir, ignore_errors=True)
    download_folder(uri, local_dir)
    return local_dir


def _complete_steps(uri: str) -> list[str]:
    """Step folders under `uri` whose manifest exists (it is written last), oldest first."""
    return [name for name in list_children(uri)
            if name.startswith("step-") and exists(join_uri(uri, name, MANIFEST_NAME))]
