"""The run manifest: what was trained, from what, how, how well, and the checksum of every file.

It is written last into the run folder; a run folder without one is incomplete. Pure: no torch,
no Prefect (versions are read from package metadata, without importing the packages).
"""
from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from tasks.store.objects import key_problem

MANIFEST_SCHEMA = 1
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "prefect", "pandera", "boto3")


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[dict]:
    return [
        {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*")) if p.is_file()
    ]


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Python's version and each of `names`' installed version (None: not installed)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(*, run: dict, base_model: dict, data: dict, config: dict, plan: dict, training: dict,
                   evaluation: dict, export: dict, files: list[dict], hardware: dict | None = None,
                   promotion: dict | None = None) -> dict:
    return {
        "schema": MANIFEST_SCHEMA,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run,
        "base_model": base_model,
        "data": data,
        "config": config,
        "plan": plan,
        "training": training,
        "evaluation": evaluation,
        "memory": memory_comparison(plan, training),
        "promotion": promotion,
        "export": export,
        "libraries": library_versions(),
        "hardware": hardware,
        "files": files,
    }


def memory_comparison(plan: dict, training: dict) -> dict:
    """The planner's peak-memory estimate next to the peak measured while training."""
    estimated = plan.get("estimate", {}).get("total")
    measured = training.get("peak_memory_bytes")
    return {"estimated_bytes": estimated, "estimate": plan.get("estimate", {}).get("kind"),  # formula, measured (probe)
            "measured_bytes": measured, "measured_kind": training.get("peak_memory_kind"),
            "measured_over_estimated": round(measured / estimated, 4) if estimated and measured else None,
            "step_downs": training.get("memory_step_downs", [])}


def verify_files(folder: Path) -> list[str]:
    """Problems found checking a run folder against its manifest; empty when every file matches."""
    return file_problems(folder, json.loads((folder / "manifest.json").read_text())["files"])


def file_problems(folder: Path, entries: list[dict]) -> list[str]:
    """Problems with the files `entries` (a manifest's "files") list under `folder`: an unsafe path,
    a missing file, or a sha256 that differs (entries without a sha256 are only checked for presence)."""
    problems = []
    for entry in entries:
        if problem := key_problem(entry["path"]):
            problems.append(f"{entry['path']!r}: {problem}")
            continue
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
    return problems
