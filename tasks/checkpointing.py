"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint folder holds the trainable weights, the optimizer and scheduler state, the random
number generators, the trainer's own state (step, eval history, early stopping) and the best model
so far (`best/`, the folder that gets published). `manifest.json`, written last, lists every file
with its sha256: a folder without it, or whose files do not match it, is not used.

Across several processes (tasks/distributed.py) rank 0 writes the folder, into which every process
first writes its random state and, under FSDP2, its shard of the model and optimizer
(`sharded/`, torch.distributed.checkpoint's files, hashed in the manifest like the rest). The
folder must be on storage every process sees (one machine, or a shared volume across machines).
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tasks.distributed import ONE_PROCESS, Parallel
from tasks.manifest import file_entries, verify_files
from tasks.storage import MANIFEST_NAME

KIND = "training-checkpoint"
SHARDED = "sharded"  # FSDP2's model and optimizer shards (torch.distributed.checkpoint)


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
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    parallel.barrier()
    return folder


def read_manifest(folder: Path) -> dict | None:
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
    manifest = read_manifest(folder)
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
