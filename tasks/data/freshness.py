"""Has the data changed? For scheduled retraining and for event-triggered runs. Pure.

- `unchanged_since_published`: the newest published run under `output` (its manifest records the
  sha256 of every data source, the commit of a Hub dataset, and a mix's weights) trained on exactly the
  data `config` names now, mixed the same way -> a reason to skip.
  The newest published run, promoted or not: a run the gate blocked already tried this data.
  Another objective (sft, dpo, orpo) or other preference settings learn something else from the same
  rows: those train.
- `etag_mismatch`: an event-triggered run names the object's ETag at upload time; when the object
  was overwritten since, the newer upload has its own event and run, and this one must not train
  on bytes it was not started for.
"""
from __future__ import annotations

import json
from typing import Protocol

from pydantic import BaseModel

from tasks.data.dataset import content_sha256
from tasks.data.hub_datasets import is_hub_dataset, resolve_split
from tasks.data.settings import DataSourceSpec
from tasks.data.sources import list_source_files
from tasks.store.objects import MANIFEST_NAME, StorageNotFoundError, join_uri, list_children, read_object
from tasks.store.registry import RUNS


class DataVersion(Protocol):
    """What these checks read of a run's config (tasks.config.FinetuneConfig has it)."""
    data: str | list[DataSourceSpec]
    eval_data: str | None
    data_etag: str | None
    output: str
    objective: str
    preference: BaseModel  # tasks.planning.settings.PreferenceSettings

    def data_sources(self) -> list[DataSourceSpec]: ...

    def model_dump(self, **kwargs) -> dict: ...


class DataChangedError(RuntimeError):
    """The data object is not the version the run was started for."""


def unchanged_since_published(config: DataVersion) -> str | None:
    """Why retraining is pointless (the newest published run used this very data, mixed the same way), or None
    to train."""
    newest = newest_published_manifest(config.output)
    if newest is None:
        return None
    run_id, manifest = newest
    defaults = type(config.preference)().model_dump(mode="json")  # settings added since that run: their defaults
    if _objective_of(manifest.get("config", {}), defaults) != _objective_of(config.model_dump(mode="json"), defaults):
        return None  # the same rows, another thing to learn from them
    recorded = manifest.get("data", {})
    if isinstance(config.data, list) and _mix_of(config) != _recorded_mix(recorded.get("mix")):
        return None  # other weights, caps or seed: other training rows
    eval_source = [DataSourceSpec(path=config.eval_data, weight=1.0)] if config.eval_data else []
    for spec in config.data_sources() + eval_source:
        if not _same_content(spec, recorded.get("sources", []), config):
            return None
    names = ", ".join(s.path for s in config.data_sources() + eval_source)
    return (f"data unchanged since run {run_id} (published {manifest.get('created_at', '?')}): "
            f"{names} have the sha256 (Hub datasets: the commit) its manifest records; "
            "not retraining. Upload new data, or start finetune/gpu to train anyway")


def _objective_of(config: dict, defaults: dict) -> tuple:
    """What a run learns from its rows: the objective, and for dpo/orpo their settings."""
    objective = config.get("objective", "sft")
    return (objective, {**defaults, **(config.get("preference") or {})} if objective != "sft" else None)


def _same_content(spec: DataSourceSpec, sources: list[dict], config) -> bool:
    """Whether the published run read this source with the same bytes (a Hub split: at the same commit)."""
    if is_hub_dataset(spec.path):
        split = spec.split or "train"
        read = [s.get("hub") or {} for s in sources if s.get("uri") == spec.path]
        commits = {h.get("commit") for h in read if h.get("config") == spec.config and h.get("split") == split}
        if not commits - {None}:  # the published run did not read this config and split
            return False
        hub = getattr(config, "hub", None)
        now = resolve_split(spec.path, spec.config, split, spec.revision, hub.cache_dir if hub else None).commit
        return now in commits
    recorded = {s["uri"]: s.get("sha256") for s in sources}
    return spec.path in recorded and content_sha256(list_source_files(spec.path)) == recorded[spec.path]


def _mix_of(config) -> tuple:
    return (config.training.seed, [(s.path, s.weight, s.max_rows) for s in config.data])


def _recorded_mix(mix: dict | None) -> tuple | None:
    if not mix:
        return None
    return (mix.get("seed"), [(s["path"], s["weight"], s["max_rows"]) for s in mix.get("sources", [])])


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
