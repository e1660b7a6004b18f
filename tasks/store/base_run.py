"""A run published in the output's registry as the base model of a new run: `model: run:<run-id>`, or
`run:latest` for the promoted run (the spelling of the CLI's `--run RUN_ID|latest`). The usual use: DPO or
ORPO starting from an SFT run; with LoRA, DPO's reference is then that SFT model with the adapter off.

The run's merged model (`<output>/runs/<id>/merged/`) is downloaded into `<work_dir>/base-runs/<id>/`, every
file checked against the sha256 in the run's manifest (tasks/store/transfer.py `download_folder`, as
`prefect-finetune download` does); `run:latest` also checks that manifest is the one latest.json was promoted
with. A complete earlier download of the same manifest is used as it is. Pure: no torch, no Prefect.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

from tasks.store.hub import CONFIG, TOKENIZER_FILES, ResolvedModel, model_problem
from tasks.store.manifest import file_problems
from tasks.store.objects import MANIFEST_NAME, StorageNotFoundError, join_uri, key_problem, read_object
from tasks.store.registry import LATEST, RUNS, read_latest, run_uri

PREFIX = "run:"
LATEST_RUN = "latest"
MERGED = "merged"
FOLDER = "base-runs"  # under work_dir


class BaseRunUnavailable(StorageNotFoundError):
    """`model: run:...` names no published run, or one without a merged model; the message says the fix."""


def is_run_reference(model: str) -> bool:
    """`run:<id>` or `run:latest` (a local folder of that name wins, as it does over a Hub id)."""
    return model.startswith(PREFIX) and not Path(model).exists()


def run_reference_problem(model: str, revision: str | None) -> str | None:
    """A config error in a `run:` model, with its fix; None when it is well formed."""
    name = model[len(PREFIX):]
    if not name.strip():
        return (f"model={model!r} names no run: give run:<run-id> (a folder under <output>/{RUNS}/) or "
                f"run:{LATEST_RUN} (the promoted run)")
    if "/" in name or (problem := key_problem(name)):
        return (f"model={model!r}: a run id is one folder name under <output>/{RUNS}/"
                f"{f' (it {problem})' if '/' not in name else ''}; give run:<run-id> or run:{LATEST_RUN}")
    if revision is not None:
        return (f"model_revision={revision!r} is for a Hugging Face Hub id, but model={model!r} is a published "
                "run (its id pins it): drop model_revision")
    return None


def model_spelling_problem(model: str, revision: str | None) -> str | None:
    """What is wrong with `model` as written (a published run, a Hub id or a folder), with its fix; None: nothing."""
    return run_reference_problem(model, revision) if is_run_reference(model) else model_problem(model, revision)


def resolve_base_run(model: str, output: str, work_dir: str, weights: bool = True,
                     concurrency: int = 8, pinned_run: str | None = None) -> ResolvedModel:
    """The local folder of the merged model of run `model` (run:<id> | run:latest) in `output`'s registry.
    `weights=False`: config.json and the tokenizer only (what ingest and plan read). `pinned_run`: the run an
    earlier call resolved `model` to; when run:latest has moved since, that run is kept (one flow run, one base)."""
    run_id, pointer = _run_id(model, output)
    if pinned_run and run_id != pinned_run:
        run_id, pointer = pinned_run, None
    manifest_bytes = _manifest_bytes(model, output, run_id)
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    if pointer and manifest_sha256 != pointer["manifest_sha256"]:
        raise BaseRunUnavailable(f"model={model!r}: run {run_id}'s manifest.json is not the one {LATEST} was "
                                 f"promoted with (changed since); promote it again, or give run:{run_id}")
    manifest = json.loads(manifest_bytes)
    wanted = _merged_files(model, output, run_id, manifest, weights)
    dest = Path(work_dir).resolve() / FOLDER / run_id
    _download(run_uri(output, run_id), dest, manifest_bytes, wanted, concurrency)
    source = manifest.get("base_model", {})
    record = {"requested": model, "output": output, "run_id": run_id, "run_uri": run_uri(output, run_id),
              "manifest_sha256": manifest_sha256, "promoted_at": pointer["promoted_at"] if pointer else None,
              "objective": manifest.get("training", {}).get("objective", "sft"),
              "method": manifest.get("training", {}).get("method"),
              # the run's own base, as its manifest records it (a chain of runs nests here)
              "base_model": {k: v for k, v in source.items() if k not in ("license", "loading")}}
    return ResolvedModel(path=str(dest / MERGED), requested=model, base_run=record)


def _run_id(model: str, output: str) -> tuple[str, dict | None]:
    name = model[len(PREFIX):]
    if name != LATEST_RUN:
        return name, None
    pointer = read_latest(output)
    if pointer is None:
        raise BaseRunUnavailable(f"model={model!r}: {join_uri(output, LATEST)} does not exist, so no run of "
                                 f"output={output!r} has been promoted; give the run as run:<run-id>, or promote "
                                 "one first: `prefect-finetune promote OUTPUT RUN_ID`")
    run_id = str(pointer.get("run_id", ""))
    if "/" in run_id or key_problem(run_id):
        raise BaseRunUnavailable(f"model={model!r}: {join_uri(output, LATEST)} names run {run_id!r}, which is not "
                                 "one folder name under runs/; promote a run again with `prefect-finetune promote "
                                 "OUTPUT RUN_ID`, or give run:<run-id>")
    return run_id, pointer


def _manifest_bytes(model: str, output: str, run_id: str) -> bytes:
    try:
        return read_object(join_uri(run_uri(output, run_id), MANIFEST_NAME)).data
    except StorageNotFoundError:
        raise BaseRunUnavailable(
            f"model={model!r}: no run {run_id!r} is published in output={output!r} ({run_uri(output, run_id)}/"
            f"{MANIFEST_NAME} does not exist: a wrong id, another output, or a publish that did not finish); give "
            f"the id of a folder under {join_uri(output, RUNS)}/ that has a {MANIFEST_NAME}, or run:{LATEST_RUN} "
            "for the promoted run") from None


def _merged_files(model: str, output: str, run_id: str, manifest: dict, weights: bool) -> list[dict]:
    merged = [e for e in manifest.get("files", []) if e["path"].startswith(f"{MERGED}/")]
    if not any(e["path"] == f"{MERGED}/{CONFIG}" for e in merged):
        adapter = any(e["path"].startswith("adapter/") for e in manifest.get("files", []))
        base = manifest.get("base_model", {})
        raise BaseRunUnavailable(
            f"model={model!r}: run {run_id} in output={output!r} has no merged model ({MERGED}/{CONFIG} is not in its "
            f"manifest{': it published its adapter only (publish.adapter_only)' if adapter else ''}), so it cannot "
            "be a base. Publish the run again without publish.adapter_only (train it again with "
            "publish.adapter_only: false), or start from its own base "
            f"({base.get('repo_id') or base.get('path', '?')})")
    if weights:
        return merged
    light = {f"{MERGED}/{name}" for name in (CONFIG, *TOKENIZER_FILES)}
    return [e for e in merged if e["path"] in light]


def _download(uri: str, dest: Path, manifest_bytes: bytes, wanted: list[dict], concurrency: int) -> None:
    """`wanted` of the run into `dest`, unless an earlier download of the same manifest holds them intact.
    A lock: two runs on this worker starting from the same run download it once, never over each other."""
    from tasks.store.transfer import download_folder

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(f".{dest.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        local = dest / MANIFEST_NAME
        if local.is_file() and local.read_bytes() == manifest_bytes and not file_problems(dest, wanted):
            return
        download_folder(uri, dest, concurrency, only={e["path"] for e in wanted})


def published_model_config(model: str, output: str) -> dict:
    """config.json of run `model`'s merged model, read in place (no download): what routing reads."""
    run_id, _ = _run_id(model, output)
    manifest = json.loads(_manifest_bytes(model, output, run_id))
    _merged_files(model, output, run_id, manifest, weights=False)
    return json.loads(read_object(join_uri(run_uri(output, run_id), MERGED, CONFIG)).data)
