"""A dataset on the Hugging Face Hub (`hf://datasets/org/name`, a config and a split), read into a local JSONL file.

`datasets.load_dataset` reads the split, always as a stream (`streaming=True`), so a large dataset is never held
in memory or converted to Arrow in the datasets cache: offline (HF_HUB_OFFLINE) from its snapshot in the Hub cache,
online from the Hub itself at the commit the revision resolved to (only the split's files are read). Its rows are
written, one JSON object a line, to `<work_dir>/hub-datasets/<org>--<name>/<commit>/<config>/<split>.jsonl`; from
there ingest treats it exactly as a file: the same checks, quarantine and accounting, with line N being row N of the
split. The file is named by the commit, so a second run on the same commit reads it again without the Hub.

Pure: `datasets` and huggingface_hub are imported only when a Hub dataset is used (the `hub-data` extra).
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.data.schemas import DatasetError
from tasks.data.settings import HUB_PREFIX as PREFIX

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")  # org/name, as huggingface_hub validates it
COMMIT = re.compile(r"^[0-9a-f]{40}$")
FOLDER = "hub-datasets"


def is_hub_dataset(uri: str) -> bool:
    return uri.startswith(PREFIX)


def hub_problem(uri: str) -> str | None:
    """What is wrong with a hf://datasets/ URI, with the fix; None when it names a repository."""
    repo = uri.removeprefix(PREFIX).rstrip("/")
    if "@" in repo:
        return (f"{uri!r}: give the revision separately (revision: {repo.partition('@')[2]!r} in the source's "
                "entry of the data list), not after '@'")
    if not REPO_ID.match(repo):
        return f"{uri!r}: a Hub dataset is hf://datasets/<org>/<name>, e.g. hf://datasets/tatsu-lab/alpaca"
    return None


@dataclass(frozen=True)
class HubSplit:
    """One split of one config of a Hub dataset, at a commit."""
    repo_id: str
    config: str | None
    split: str
    revision: str | None  # as asked: branch, tag or commit; None: the default branch
    commit: str
    location: str  # the snapshot folder it is read from (offline), or the repo id (read from the Hub)

    @property
    def label(self) -> str:
        config = f"config {self.config}" if self.config else "default config"
        return f"{PREFIX}{self.repo_id} ({config}, split {self.split}, commit {self.commit})"

    def describe(self) -> dict:
        """What the manifest records of it."""
        from huggingface_hub import constants

        return {"repo_id": self.repo_id, "config": self.config, "split": self.split,
                "requested_revision": self.revision, "commit": self.commit, "endpoint": constants.ENDPOINT}


def resolve_split(uri: str, config: str | None, split: str, revision: str | None, cache_dir: str | None = None,
                  token: str | None = None) -> HubSplit:
    """Which commit the split is read at and from where: the Hub cache's snapshot when offline (or when the
    revision is a commit that is cached), else the Hub, pinned to the commit the revision points at now."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id = uri.removeprefix(PREFIX).rstrip("/")
    with _hub_errors(uri, revision, cache_dir):
        if constants.HF_HUB_OFFLINE or (revision and COMMIT.match(revision)):
            try:
                folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                           token=token, local_files_only=True)
                return HubSplit(repo_id, config, split, revision, Path(folder).name, folder)
            except LocalEntryNotFoundError:
                if constants.HF_HUB_OFFLINE:
                    raise
        commit = HfApi().dataset_info(repo_id, revision=revision, token=token).sha
    return HubSplit(repo_id, config, split, revision, commit, repo_id)


def local_copy(hub: HubSplit, work_dir: str, max_rows: int, token: str | None = None) -> Path:
    """The split's rows as JSONL under work_dir (written once per commit, config and split)."""
    path = (Path(work_dir) / FOLDER / hub.repo_id.replace("/", "--") / hub.commit / _safe(hub.config or "default")
            / f"{_safe(hub.split)}.jsonl")
    if path.is_file():
        return path
    rows = _stream(hub, token)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as out, _reading(hub):
            for number, row in enumerate(rows, start=1):
                if number > max_rows:  # stop reading: the rest is never fetched
                    raise DatasetError(f"{hub.label}: more than data_checks.max_rows={max_rows:,} rows; take a part "
                                       "of it (a split such as 'train[:100000]') or raise the limit")
                out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        partial.replace(path)  # whole or absent: a crash half way leaves no file that looks complete
    finally:
        partial.unlink(missing_ok=True)
    return path


def _stream(hub: HubSplit, token: str | None):
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{hub.label}: reading a Hub dataset needs the `datasets` package: "
                           "pip install 'prefect-finetune[hub-data]'") from None
    try:
        return iter(datasets.load_dataset(hub.location, name=hub.config, split=hub.split, streaming=True,
                                          revision=None if Path(hub.location).is_dir() else hub.commit,
                                          token=token))
    except ValueError as error:  # datasets' own words name what the repo has: "Available: ['default']"
        setting = "config" if "BuilderConfig" in str(error) or "config" in str(error).lower() else "split"
        raise DatasetError(f"{hub.label}: {error}; set the source's {setting} to one the dataset has") from None


@contextmanager
def _reading(hub: HubSplit):
    """A file of the dataset that its reader cannot parse fails the run naming the dataset, not a bare traceback."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as error:
        raise DatasetError(f"{hub.label}: cannot be read ({type(error).__name__}: {str(error)[:200]}); check the "
                           "dataset's files, or pick another config or split") from error


def _safe(name: str) -> str:
    """A split such as 'train[:10%]' as a file name."""
    return re.sub(r"[^\w.-]", "_", name)


def download_command(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    return " ".join(["hf download", repo_id, "--repo-type dataset", *(["--revision", revision] if revision else []),
                     *(["--cache-dir", cache_dir] if cache_dir else [])])


@contextmanager
def _hub_errors(uri: str, revision: str | None, cache_dir: str | None):
    """huggingface_hub's errors, re-raised as a DatasetError that names the source and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    name = f"{uri}" + (f" (revision {revision!r})" if revision else "")
    repo_id = uri.removeprefix(PREFIX).rstrip("/")
    try:
        yield
    except GatedRepoError:
        raise DatasetError(f"{name} is a gated dataset: accept its terms on the Hub, then give a token "
                           "(hub.token_secret, or HF_TOKEN on the worker)") from None
    except RevisionNotFoundError:
        raise DatasetError(f"{name}: the Hub has no such revision; set revision to a branch, tag or commit sha "
                           "it has") from None
    except RepositoryNotFoundError:
        raise DatasetError(f"{name}: no such dataset on {constants.ENDPOINT}, or it is private and the token "
                           "cannot read it; check the id, or give a token (hub.token_secret, or HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        cache = cache_dir or constants.HF_HUB_CACHE
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the Hub ({constants.ENDPOINT}) cannot be reached")
        raise DatasetError(f"{name} is not in the Hugging Face cache {cache} and {why}. Download it once where the "
                           f"Hub is reachable, into the cache the workers share: "
                           f"`{download_command(repo_id, revision, cache)}`") from None
