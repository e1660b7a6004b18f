"""Has the data changed? For scheduled retraining and for event-triggered runs. Pure.

- `unchanged_since_published`: the newest published run under `output` (its manifest records the
  sha256 of every data source) trained on exactly the data `config` names now -> a reason to skip.
  The newest published run, promoted or not: a run the gate blocked already tried this data.
- `etag_mismatch`: an event-triggered run names the object's ETag at upload time; when the object
  was overwritten since, the newer upload has its own event and run, and this one must not train
  on bytes it was not started for.
"""
from __future__ import annotations

import json
from typing import Protocol

from tasks.data.dataset import content_sha256
from tasks.data.sources import list_source_files
from tasks.store.objects import MANIFEST_NAME, StorageNotFoundError, join_uri, list_children, read_object
from tasks.store.registry import RUNS


class DataVersion(Protocol):
    """What these checks read of a run's config (tasks.config.FinetuneConfig has it)."""
    data: str
    eval_data: str | None
    data_etag: str | None
    output: str


class DataChangedError(RuntimeError):
    """The data object is not the version the run was started for."""


def unchanged_since_published(config: DataVersion) -> str | None:
    """Why retraining is pointless (the newest published run used this very data), or None to train."""
    newest = newest_published_manifest(config.output)
    if newest is None:
        return None
    run_id, manifest = newest
    recorded = {s["uri"]: s.get("sha256") for s in manifest.get("data", {}).get("sources", [])}
    for uri in filter(None, (config.data, config.eval_data)):
        if uri not in recorded:
            return None
        if content_sha256(list_source_files(uri)) != recorded[uri]:
            return None
    return (f"data unchanged since run {run_id} (published {manifest.get('created_at', '?')}): "
            f"{', '.join(filter(None, (config.data, config.eval_data)))} have the sha256 its manifest records; "
            "not retraining. Upload new data, or start finetune/gpu to train anyway")


def newest_published_manifest(output: str) -> tuple[str, dict] | None:
    """(run id, manifest) of the newest run under <output>/runs/ that finished publishing (has a manifest).
    Run ids start with their UTC start time, so the newest sorts last."""
    for run_id in sorted(list_children(join_uri(output, RUNS)), reverse=True):
        try:
            body = read_object(join_uri(output, RUNS, run_id, MANIFEST_NAME)).data
        except StorageNotFoundError:  # a run whose publish did not finish
            continue
        return run_id, json.loads(body)
    return None


def etag_mismatch(config: DataVersion) -> str | None:
    """Why the run must not train (its object changed since the event), or None."""
    if not config.data_etag:
        return None
    files = list_source_files(config.data)
    now = {f.etag for f in files}
    if now == {config.data_etag.strip('"')}:
        return None
    return (f"{config.data} has ETag {', '.join(sorted(filter(None, now))) or 'none'} but this run was started for "
            f"ETag {config.data_etag}: the object was overwritten after the event; the newer upload starts its "
            "own run. Clear data_etag to train on whatever is there now")
