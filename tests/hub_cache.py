"""A Hugging Face Hub cache laid out exactly as huggingface_hub lays it out, built offline from a model (or dataset)
folder:

    <cache>/models--<org>--<name>/blobs/<sha256>               the files' bytes, stored once by content
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>    relative symlinks to the blobs
    <cache>/models--<org>--<name>/refs/<branch>                the commit the branch pointed at
    (datasets--<org>--<name>/... for a dataset repository)

The tests check the layout with huggingface_hub's own readers (try_to_load_from_cache, scan_cache_dir), so
what they resolve is what a real `hf download` would have left.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex git sha, as the Hub's


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, branch: str = "main",
                     only: tuple[str, ...] | None = None, repo_type: str = "model") -> Path:
    """Cache `folder`'s files (or those named in `only`) as `repo_id` at `commit`; returns the snapshot folder."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if only is not None and name not in only:
            continue
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def offline_hub_cache(cache: Path, monkeypatch) -> Path:
    """`cache` as the Hub cache, and the Hub out of reach as HF_HUB_OFFLINE=1 makes it. huggingface_hub (and
    datasets) read the variables when they are imported, so their constants are set too for this process."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
