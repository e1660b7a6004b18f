"""A model named by its Hugging Face Hub id (`org/name`, optionally a revision), resolved into a local folder.

huggingface_hub does the work and keeps its own conventions, which nothing here overrides: the cache layout
(`models--org--name/{blobs,refs,snapshots/<commit>}`), where the cache is (`hub.cache_dir`, else HF_HUB_CACHE,
else HF_HOME/hub), the endpoint (HF_ENDPOINT, for a mirror: no `endpoint=` is ever passed), HF_HUB_OFFLINE,
and the token (a Prefect Secret's when the run names one, else HF_TOKEN or `hf auth login`'s). Every worker
that points at the same cache folder (a shared volume) finds a model another one downloaded, so a fleet
downloads it once; with `hub.mirror`, an S3 prefix serves the fleet as the shared copy instead
(tasks/store/hub_mirror.py). A folder that exists wins over a Hub id of the same spelling, as in transformers.

Pure: no torch, no Prefect; huggingface_hub (a pure-Python dependency) is imported when a Hub id is used.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.store import hub_mirror
from tasks.store.objects import StorageNotFoundError, is_s3_uri

# huggingface_hub's own rule for a repo id (validate_repo_id), restricted to `org/name`: a bare `name` is far
# more often a local folder that is missing than one of the Hub's few old unprefixed models.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
CONFIG = "config.json"
# What `plan` and the tokenizer read: never the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# Never needed to train from a transformers checkpoint: other runtimes' copies of the weights.
ALWAYS_SKIPPED = ["original/*", "*.gguf", "onnx/*", "*.onnx", "*.msgpack", "*.h5", "*.tflite", "*.mlmodel",
                  "openvino/*", "coreml/*"]
PICKLES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]


class HubSettings(BaseModel):
    """Where a model named by its Hub id is kept, and with which token it is downloaded."""

    model_config = ConfigDict(extra="forbid")  # unknown keys are typos: rejected
    cache_dir: str | None = Field(
        None, description="The Hugging Face cache folder the workers share (e.g. a shared volume), so a model is "
        "downloaded once for the fleet. Empty: huggingface_hub's own (HF_HUB_CACHE, else HF_HOME/hub, else "
        "~/.cache/huggingface/hub).",
    )
    token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding a Hugging Face token, for gated or private "
        "models. Empty: HF_TOKEN or the token saved by `hf auth login` on the worker, if any.",
    )
    mirror: str | None = Field(
        None, description="An S3 prefix (s3://bucket/prefix/) the workers share as a mirror of the Hub cache: a "
        "model is taken from there when it holds the revision's snapshot, else fetched from the Hub once and "
        "published there. The mirror pins the commit first fetched for a branch name; name a commit in "
        "model_revision, or delete <mirror>/models--<org>--<name>/refs/<branch>, to move it.",
    )

    @field_validator("mirror")
    @classmethod
    def _mirror_is_a_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if is_s3_uri(value) and not value[len("s3://"):].split("/")[0]:
            raise ValueError(f"hub.mirror={value!r} names no bucket: use s3://bucket/prefix/")
        if not is_s3_uri(value) and not Path(value).is_absolute():
            raise ValueError(f"hub.mirror={value!r}: give an s3://bucket/prefix/ URI (or an absolute folder path)")
        return value


class ResolvedModel(BaseModel):
    """The local folder a run loads its model from, and where it came from."""

    path: str  # a local folder: the user's own, or a snapshot in the Hub cache
    requested: str  # `model` as the user gave it
    repo_id: str | None = None  # set when `model` was a Hub id
    revision: str | None = None  # the revision asked for (branch, tag or commit); None: the repo's default
    commit: str | None = None  # the Hub commit sha the files come from
    endpoint: str | None = None  # the Hub (or mirror, HF_ENDPOINT) it was resolved against
    mirror: str | None = None  # the hub.mirror snapshot its files came from; None: from the Hub or the local cache
    published: str | None = None  # the hub.mirror snapshot this call published after fetching from the Hub
    base_run: dict | None = None  # set when `model` was a published run (run:<id>): tasks/store/base_run.py

    @property
    def run_id(self) -> str | None:
        """The published run a `run:` model resolved to (run:latest may point elsewhere a moment later)."""
        return self.base_run["run_id"] if self.base_run else None

    def describe(self) -> dict:
        """What the manifest records of a Hub model or a published run (nothing for a local folder)."""
        if self.base_run:
            return {"run": self.base_run}
        return {"repo_id": self.repo_id, "requested_revision": self.revision, "commit": self.commit,
                "endpoint": self.endpoint, "source": "mirror" if self.mirror else "hub",
                "mirror": self.mirror} if self.repo_id else {}


class HubModelUnavailable(StorageNotFoundError):
    """A Hub model that is neither in the cache nor downloadable now; the message says what to do."""


def is_hub_id(model: str) -> bool:
    """`org/name` that is not a local path or an s3:// URI."""
    return bool(HUB_ID.match(model)) and not is_s3_uri(model) and not Path(model).exists()


def model_problem(model: str, revision: str | None) -> str | None:
    """A config error in `model` / `model_revision`, phrased with its fix; None when they fit together."""
    if "@" in model and not is_s3_uri(model) and not Path(model).exists():
        repo, _, rev = model.partition("@")
        return (f"model={model!r}: give the revision separately, as transformers' `revision=` does: "
                f"model={repo!r}, model_revision={rev!r}")
    if revision is not None and not is_hub_id(model):
        return (f"model_revision={revision!r} is for a Hugging Face Hub id (org/name), but model={model!r} is a "
                "local folder or s3:// URI: drop model_revision, or name the model by its Hub id")
    if revision is not None and not revision.strip():
        return "model_revision is empty: give a branch, tag or commit sha, or leave it out for the default branch"
    return None


def resolve_model(model: str, revision: str | None = None, cache_dir: str | None = None, token: str | None = None,
                  weights: bool = True, allow_pickles: bool = False, remote_code: bool = False,
                  mirror: str | None = None, commit: str | None = None) -> ResolvedModel:
    """The local folder of `model`: itself when it is a folder, else its snapshot in the Hub cache.

    `weights=False` fetches only config.json and the tokenizer (for planning and token counts). Weights come
    as safetensors; pickle files only with `allow_pickles`, Python files only with `remote_code`. `commit`
    pins the files to that commit (`revision` is then only the name asked for). With `mirror`, the snapshot
    comes from there when it holds it complete; else from the Hub, and a full one (weights) is published there.
    """
    if not is_hub_id(model):
        return ResolvedModel(path=model, requested=model, commit=_commit_in_cache_path(model))
    from huggingface_hub import constants, snapshot_download

    patterns = None if weights else [CONFIG, *TOKENIZER_FILES]
    skipped = ALWAYS_SKIPPED + ([] if allow_pickles else PICKLES) + ([] if remote_code else ["*.py"])
    if mirror and (commit := commit or hub_mirror.pinned_commit(mirror, model, revision)):
        found = hub_mirror.find_snapshot(mirror, model, commit)
        if found and found.covers(skipped):
            return _from_mirror(found, model, revision, commit, cache_dir, weights, allow_pickles, patterns, skipped)
    with _hub_errors(model, revision, cache_dir):
        folder = snapshot_download(model, revision=commit or revision, cache_dir=cache_dir, token=token,
                                   allow_patterns=patterns, ignore_patterns=skipped)
    _require_complete(Path(folder), model, revision, cache_dir, weights, allow_pickles)
    published = None
    if mirror and weights:
        try:
            published = hub_mirror.publish_snapshot(mirror, model, revision, Path(folder), skipped, constants.ENDPOINT)
        except FileExistsError:  # another worker published this commit with other file filters: its copy stands
            published = None
    return ResolvedModel(path=folder, requested=model, repo_id=model, revision=revision,
                         commit=Path(folder).name, endpoint=constants.ENDPOINT, published=published)


def _from_mirror(found: hub_mirror.MirroredSnapshot, model: str, revision: str | None, commit: str,
                 cache_dir: str | None, weights: bool, allow_pickles: bool, patterns: list[str] | None,
                 skipped: list[str]) -> ResolvedModel:
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    wanted = list(filter_repo_objects([e["path"] for e in found.record["files"]], allow_patterns=patterns,
                                      ignore_patterns=skipped))
    folder = hub_mirror.fetch_snapshot(found, model, commit, Path(cache_dir or constants.HF_HUB_CACHE), wanted,
                                       revision)
    _require_complete(folder, model, revision, cache_dir, weights, allow_pickles)
    return ResolvedModel(path=str(folder), requested=model, repo_id=model, revision=revision, commit=commit,
                         endpoint=found.record.get("endpoint"), mirror=found.uri)


def hub_config(model: str, revision: str | None = None, cache_dir: str | None = None,
               token: str | None = None) -> Path:
    """config.json of a Hub model, alone: what the planner reads (a cached copy when there is one)."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(model, revision, cache_dir):
        return Path(hf_hub_download(model, CONFIG, revision=revision, cache_dir=cache_dir, token=token))


def download_command(model: str, revision: str | None, cache_dir: str | None) -> str:
    return " ".join(["hf download", model, *(["--revision", revision] if revision else []),
                     *(["--cache-dir", cache_dir] if cache_dir else [])])


def _commit_in_cache_path(model: str) -> str | None:
    """The Hub commit of a folder inside a Hugging Face cache (…/snapshots/<commit>), else None."""
    parts = Path(model).resolve().parts if not is_s3_uri(model) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _require_complete(folder: Path, model: str, revision: str | None, cache_dir: str | None, weights: bool,
                      allow_pickles: bool) -> None:
    """Offline, huggingface_hub returns a cached snapshot as it is: `plan` may have cached config.json alone."""
    kinds = ["*.safetensors", *(PICKLES if allow_pickles else [])]
    missing = [CONFIG] if not (folder / CONFIG).is_file() else []
    if weights and not any(next(folder.glob(kind), None) for kind in kinds):
        missing.append("weights (*.safetensors)")
    if missing:
        raise HubModelUnavailable(
            f"model={model!r}: the cached snapshot {folder} lacks {' and '.join(missing)} and the Hub was not asked "
            f"(offline) or has none. Complete it where the Hub is reachable: "
            f"`{download_command(model, revision, cache_dir)}`"
            " (older huggingface_hub: `huggingface-cli download` with the same arguments), or set model to a local "
            "folder that holds the whole model")


@contextmanager
def _hub_errors(model: str, revision: str | None, cache_dir: str | None):
    """huggingface_hub's errors, re-raised as one that names the setting to change and how."""
    try:
        yield
    except Exception as error:
        message = _explain(error, model, revision, cache_dir)
        if message is None:
            raise
        raise HubModelUnavailable(message) from error


def _explain(error: Exception, model: str, revision: str | None, cache_dir: str | None) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    name = f"model={model!r}" + (f" (model_revision={revision!r})" if revision else "")
    cache = cache_dir or constants.HF_HUB_CACHE
    fetch = (f"`{download_command(model, revision, cache)}` (older huggingface_hub: `huggingface-cli download` "
             "with the same arguments)")
    if isinstance(error, GatedRepoError):
        return (f"{name} is a gated repository: accept its terms on the Hub with your account, then give a "
                "token: hub.token_secret naming a Prefect Secret block that holds it, or HF_TOKEN on the worker")
    if isinstance(error, RevisionNotFoundError):
        return f"{name}: the Hub has no such revision; set model_revision to a branch, tag or commit sha it has"
    if isinstance(error, RepositoryNotFoundError):
        return (f"{name}: no such repository on {constants.ENDPOINT}, or it is private and the token cannot read "
                "it; check the id (no local folder of that name exists either), or give a token "
                "(hub.token_secret, or HF_TOKEN)")
    if isinstance(error, RemoteEntryNotFoundError):
        return f"{name}: the repository has no {CONFIG}, so it is not a transformers model"
    if isinstance(error, IncompleteSnapshotError):
        return f"{name}: its snapshot in {cache} is incomplete and the Hub cannot be reached; complete it: {fetch}"
    if isinstance(error, LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the Hub ({constants.ENDPOINT}, set by HF_ENDPOINT) cannot be reached")
        return (f"{name} is not in the Hugging Face cache {cache} and {why}. Download it once where the Hub is "
                f"reachable, into the cache the workers share: {fetch}; or set model to a local folder holding "
                "the model")
    return None
