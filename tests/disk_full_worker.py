"""Trains the tiny model (tests/resume_worker.py) on a disk that fills up, and reports what it left.
Run by tests/test_disk_full.py inside a mount namespace whose small tmpfs is mounted over the work
folder or its checkpoints; that mount is gone when this process ends, so everything the test checks
is written outside it: a JSON report and copies of the last complete checkpoint and the best model.
"""
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resume_worker import run  # noqa: E402
from tasks.engine.checkpoints import CheckpointWriteError, read_checkpoint_manifest  # noqa: E402


def main(model_dir: str, work: Path, report: Path, copies: Path) -> None:
    checkpoints = work / "checkpoints"
    outcome = {"error": None}
    try:
        run(model_dir, work)
    except CheckpointWriteError as error:
        outcome["error"] = str(error)
    outcome["work"] = sorted(p.name for p in work.iterdir())  # hidden .partial folders included
    outcome["checkpoints"] = sorted(p.name for p in checkpoints.iterdir())
    outcome["complete"] = {p.name: read_checkpoint_manifest(p)["step"] for p in checkpoints.iterdir() if read_checkpoint_manifest(p)}
    if outcome["complete"]:
        shutil.copytree(checkpoints / max(outcome["complete"]), copies / "checkpoint")
    if (work / "best").is_dir():
        shutil.copytree(work / "best", copies / "best")
    report.write_text(json.dumps(outcome))


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
