"""An S3 prefix (or a folder) as a mirror of the Hugging Face Hub cache, so a fleet downloads a model once.

Layout under the mirror, named as huggingface_hub names its cache:

    <mirror>/models--<org>--<name>/snapshots/<commit>/<file>          the snapshot's files
    <mirror>/models--<org>--<name>/snapshots/<commit>/manifest.json   its completion record, written last
    <mirror>/models--<org>--<name>/refs/<revision>                    the commit a branch or tag name pins

A snapshot counts only once its record is there (each file's path, size and sha256; tasks/store/transfer.py
uploads it last), so a half-upload is never used. The first worker that fetches a revision from the Hub
publishes the snapshot (files, then the record) and then the ref, written only where none is: the mirror pins
the commit the fleet first fetched for a branch name, and a branch that moves on the Hub is not followed. To
move it, name the commit (`model_revision=<sha>`), or delete the ref object (the next run fetches the branch
from the Hub and pins its commit then).

Files come down into the local Hub cache (`hub.cache_dir`, else HF_HUB_CACHE) laid out as huggingface_hub lays
it out (blobs by sha256, snapshot symlinks, the ref), each checked against the record's sha256 first. Pure: no
torch, no Prefect; S3 through tasks/store/objects.py and transfer.py (boto3's credentials chain, which
`aws_credentials_secret` fills).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from tasks.store.objects import (
    MANIFEST_NAME,
    StorageNotFoundError,
    join_uri,
    read_object,
    safe_local_path,
    write_if_unchanged,
)
from tasks.store.transfer import ChecksumMismatchError, download_folder, upload_folder

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_REVISION = "main"  # huggingface_hub's, when no revision is named


class MirroredSnapshot:
    """A complete snapshot in the mirror: where it is and its record."""

    def __init__(self, uri: str, record: dict):
        self.uri, self.record = uri, record

    def covers(self, skipped: list[str]) -> bool:
        """Whether it holds every file this call wants: what its publisher left out, this call leaves out too."""
        return set(self.record.get("ignore_patterns", [])) <= set(skipped)


def repo_uri(mirror: str, repo_id: str) -> str:
    return join_uri(mirror, f"models--{repo_id.replace('/', '--')}")


def pinned_commit(mirror: str, repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` means for this fleet: itself when it is a commit sha, else the mirror's ref."""
    if revision and COMMIT_SHA.match(revision):
        return revision
    try:
        text = read_object(join_uri(repo_uri(mirror, repo_id), "refs", revision or DEFAULT_REVISION)).data
    except StorageNotFoundError:
        return None
    commit = text.decode("utf-8", "replace").strip()
    if not COMMIT_SHA.match(commit):
        raise ValueError(f"{join_uri(repo_uri(mirror, repo_id), 'refs', revision or DEFAULT_REVISION)}: holds "
                         f"{commit[:60]!r}, not a 40-hex commit sha; delete it (the next run pins the Hub's commit)")
    return commit


def find_snapshot(mirror: str, repo_id: str, commit: str) -> MirroredSnapshot | None:
    """The mirror's snapshot of `commit`, or None when it is not there or its upload did not finish."""
    uri = join_uri(repo_uri(mirror, repo_id), "snapshots", commit)
    try:
        record = json.loads(read_object(join_uri(uri, MANIFEST_NAME)).data)
    except StorageNotFoundError:
        return None
    return MirroredSnapshot(uri, record)


def fetch_snapshot(found: MirroredSnapshot, repo_id: str, commit: str, cache: Path, wanted: list[str],
                   revision: str | None) -> Path:
    """The files `wanted` of a mirrored snapshot, in the local Hub cache; returns the snapshot folder.

    Files already in the local snapshot at the recorded size stay; the rest are downloaded to a hidden folder,
    checked against their sha256 (ChecksumMismatchError: nothing enters the cache), then moved into place."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in (e["path"] for e in found.record["files"]):  # remote data: every path checked before any is used
        safe_local_path(repo, f"snapshots/{commit}/{path}", join_uri(found.uri, MANIFEST_NAME))  # links: to blobs/
    sizes = {e["path"]: e["bytes"] for e in found.record["files"]}
    missing = {p for p in wanted if not ((snapshot / p).is_file() and (snapshot / p).stat().st_size == sizes[p])}
    if missing:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=repo, prefix=f".mirror-{commit}.", suffix=".partial"))
        try:
            try:
                download_folder(found.uri, staging, only=missing)
            except ChecksumMismatchError as error:
                raise ChecksumMismatchError(
                    f"{found.uri}: the mirror's copy of {repo_id} at commit {commit} is corrupt "
                    f"({'; '.join(error.problems[:3]) or error}); refusing it. Delete that prefix from the mirror "
                    "(the next run fetches the model from the Hub and publishes it again)", error.problems) from error
            for entry in (e for e in found.record["files"] if e["path"] in missing):
                _into_cache(staging / entry["path"], repo, snapshot / entry["path"], entry["sha256"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    ref = repo / "refs" / (revision or DEFAULT_REVISION)
    if not (revision and COMMIT_SHA.match(revision)) and not ref.exists():
        ref.parent.mkdir(parents=True, exist_ok=True)  # offline huggingface_hub calls find the branch too
        ref.write_text(commit)
    return snapshot


def _into_cache(file: Path, repo: Path, link: Path, sha256: str) -> None:
    """As huggingface_hub stores a file: its bytes once in blobs/, a relative symlink in the snapshot."""
    blob = repo / "blobs" / sha256
    blob.parent.mkdir(parents=True, exist_ok=True)
    os.replace(file, blob)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def publish_snapshot(mirror: str, repo_id: str, revision: str | None, folder: Path, skipped: list[str],
                     endpoint: str) -> str:
    """Upload a snapshot fetched from the Hub (files, then its record), then pin the ref if none is there.
    Safe to repeat and to race: the same snapshot's record is the same bytes (no timestamps). Returns its URI."""
    from tasks.store.manifest import file_entries

    commit = folder.name
    uri = join_uri(repo_uri(mirror, repo_id), "snapshots", commit)
    with tempfile.TemporaryDirectory(prefix="mirror-publish-") as scratch:
        staging = Path(scratch) / commit
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):  # links to the blobs: nothing copied
            link = staging / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file.resolve())
        record = {"repo_id": repo_id, "commit": commit, "endpoint": endpoint, "ignore_patterns": sorted(skipped),
                  "files": file_entries(staging)}
        (staging / MANIFEST_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
        upload_folder(staging, uri)
    if not (revision and COMMIT_SHA.match(revision)):  # a commit needs no ref; the first publisher's ref stands
        write_if_unchanged(join_uri(repo_uri(mirror, repo_id), "refs", revision or DEFAULT_REVISION),
                           commit.encode(), None, content_type="text/plain")
    return uri
