"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint folder holds the trainable weights, the optimizer and scheduler state, the random
number generators, the trainer's own state (step, eval history, early stopping) and the best model
so far (`best/`, the folder that gets published). `manifest.json`, written last, lists every file
with its sha256: a folder without it, or whose files do not match it, is not used.

Across several processes (tasks/engine/distributed.py) rank 0 writes the folder, into which every process
first writes its random state and, under FSDP2, its shard of the model and optimizer
(`sharded/`, torch.distributed.checkpoint's files, hashed in the manifest like the rest). The
folder must be on storage every process sees (one machine, or a shared volume across machines).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tasks.engine.distributed import ONE_PROCESS, Parallel
from tasks.store.manifest import file_entries, verify_files
from tasks.store.objects import MANIFEST_NAME

KIND = "training-checkpoint"
SHARDED = "sharded"  # FSDP2's model and optimizer shards (torch.distributed.checkpoint)
FULL_BELOW_BYTES = 1 << 20  # less free than this when a write failed: the disk was full


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says which, why, and what is still there."""


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict, best_dir: Path | None,
                    parallel: Parallel = ONE_PROCESS) -> Path:
    """Write the checkpoint to a hidden sibling, then rename: a crash leaves no half folder."""
    partial = folder.with_name(f".{folder.name}.partial")
    if parallel.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    parallel.barrier()
    if parallel.sharded:
        parallel.save_sharded(optimizer, partial / SHARDED)
    rng = parallel.gather(_rng_state())  # dropout masks differ per process: each resumes its own
    if not parallel.is_main:
        parallel.barrier()  # until rank 0 has written the manifest and renamed the folder
        return folder
    try:
        _write(partial, model, optimizer, scheduler, state, best_dir, parallel, rng)
    except Exception as error:  # disk full, quota, read-only: the earlier checkpoints stay as they were
        free_then = shutil.disk_usage(partial.parent).free
        shutil.rmtree(partial, ignore_errors=True)  # give back what the half checkpoint took
        raise CheckpointWriteError(_write_failure(folder, state["step"], error, free_then)) from error
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    parallel.barrier()
    return folder


def _write(partial: Path, model, optimizer, scheduler, state: dict, best_dir: Path | None, parallel: Parallel,
           rng: list[dict]) -> None:
    if not parallel.sharded:  # DDP replicates the adapters and their optimizer: rank 0's are everyone's
        trainable = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()
                     if p.requires_grad}
        save_file(trainable, partial / "trainable.safetensors")
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    torch.save({**rng[0], "ranks": rng} if parallel.distributed else rng[0], partial / "rng.pt")
    if best_dir is not None and best_dir.is_dir():
        shutil.copytree(best_dir, partial / "best")
    manifest = {"kind": KIND, "step": state["step"], "saved_at": datetime.now(timezone.utc).isoformat(),
                "state": state, "files": file_entries(partial)}
    (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def save_best(model, best_dir: Path, step: int, parallel: Parallel = ONE_PROCESS) -> None:
    """The best model so far, written beside `best_dir` and then swapped in, so a failed write
    (a full disk) leaves the previous best model whole."""
    partial = best_dir.with_name(f".{best_dir.name}.partial")
    if parallel.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    try:
        parallel.save_pretrained(model, partial)
    except Exception as error:
        free_then = shutil.disk_usage(partial.parent).free
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointWriteError(f"could not save the best model so far (step {step}) to {best_dir}: "
                                   f"{_cause(error, free_then)}; the partial folder was removed and the previous "
                                   f"best model is kept. {GO_ON}") from error
    if parallel.is_main:
        shutil.rmtree(best_dir, ignore_errors=True)
        os.replace(partial, best_dir)


GO_ON = ("Free space on that disk or set work_dir to a larger one, then retry the flow run: it continues from "
         "its last complete checkpoint")


def _write_failure(folder: Path, step: int, error: Exception, free_then: int) -> str:
    """What failed and why, the last checkpoint that is still complete, and how to go on."""
    # newest first, stopping at the first intact one: checking a checkpoint hashes all of its files
    earlier = (p for p in sorted(folder.parent.glob("step-*"), reverse=True) if p.name < folder.name)
    intact = next(((p, m) for p in earlier if (m := read_checkpoint_manifest(p)) is not None), None)
    kept = (f"the last complete checkpoint, {intact[0]} (step {intact[1]['step']}), is intact"
            if intact else "there is no earlier checkpoint, so a retry starts from step 0")
    return (f"could not write the checkpoint for step {step} to {folder}: {_cause(error, free_then)}; the "
            f"partial folder was removed and {kept}. {GO_ON}")


def _cause(error: Exception, free_then: int) -> str:
    # torch.save and safetensors do not raise OSError on a full disk (torch: "unexpected pos 576 vs
    # 534"), so a full disk is told by the space left when the write failed.
    free = f"{free_then / 2**20:.1f} MiB free when it failed"
    if getattr(error, "errno", None) == errno.ENOSPC or free_then < FULL_BELOW_BYTES:
        return f"no space left on device ({free})"
    first_line = (str(error).splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first_line} ({free})"


def read_checkpoint_manifest(folder: Path) -> dict | None:
    """The checkpoint's manifest when the folder is complete and intact, else None."""
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("kind") != KIND or verify_files(folder):
        return None
    return manifest


def load_checkpoint(folder: Path, model, optimizer, scheduler, parallel: Parallel = ONE_PROCESS) -> dict:
    """Restore weights, optimizer, scheduler and RNGs in place; returns the trainer state."""
    manifest = read_checkpoint_manifest(folder)
    if manifest is None:
        raise ValueError(f"{folder} is not a complete training checkpoint (missing or mismatching manifest)")
    if (folder / SHARDED).is_dir() != parallel.sharded:
        raise ValueError(f"{folder} was written {'with' if (folder / SHARDED).is_dir() else 'without'} FSDP "
                         f"sharding and this run trains {'with' if parallel.sharded else 'without'} it; "
                         "resume full fine-tuning with more than one process, adapters with any number")
    if parallel.sharded:
        parallel.load_sharded(optimizer, folder / SHARDED)
    else:
        _load_replicated(folder, model, optimizer)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    ranks = rng.get("ranks", [])
    _set_rng_state(ranks[parallel.rank] if len(ranks) == parallel.world_size else rng)
    return manifest["state"]


def _load_replicated(folder: Path, model, optimizer) -> None:
    saved = load_file(folder / "trainable.safetensors")
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != parameters.keys():
        missing, extra = parameters.keys() - saved.keys(), saved.keys() - parameters.keys()
        raise ValueError(f"{folder} does not match this model's trainable parameters "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}); "
                         "it was written by a run with another method, model or LoRA setting")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
