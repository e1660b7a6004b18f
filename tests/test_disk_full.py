"""The disk fills up while a checkpoint or the best model is written: a clear failure, the last good
checkpoint and best model intact, and the run continues from them once there is room. The full disk
is real: a tmpfs of a few checkpoints' size mounted, in a mount namespace of the training process
(`unshare`, no root needed), over the folder being written."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disk_full_worker import folder_digest
from resume_worker import run
from test_resume import trainable

PAGE = 4096  # tmpfs charges whole pages per file


def _why_no_tmpfs() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True)
    return (probe.stderr.strip() or f"exit {probe.returncode}") if probe.returncode else None


pytestmark = pytest.mark.skipif(bool(reason := _why_no_tmpfs()), reason=f"cannot mount a tmpfs: {reason}")


def on_disk(folder: Path) -> int:
    return sum(math.ceil(p.stat().st_size / PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """The run without the fault (checkpoints every 2 of 8 steps, eval every 3), and what it wrote."""
    work = tmp_path_factory.mktemp("straight")
    model, outcome = run(str(tiny_model), work)
    sizes = {p.name: on_disk(p) for p in (work / "checkpoints").iterdir()}
    return {"trainable": trainable(model), "outcome": outcome, "sizes": sizes, "best": on_disk(work / "best")}


def train_on_small_disk(tiny_model, tmp_path: Path, mounted_over: str, room: int) -> tuple[dict, Path]:
    work, report, copies = tmp_path / "full", tmp_path / "report.json", tmp_path / "copies"
    (work / "checkpoints").mkdir(parents=True)
    worker = Path(__file__).with_name("disk_full_worker.py")
    script = (f"mount -t tmpfs -o size={room} tmpfs {work / mounted_over} && mkdir -p {work / 'checkpoints'} && "
              f"exec {sys.executable} {worker} {tiny_model} {work} {report} {copies}")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report.read_text()), copies


def continues_to_the_same_result(tiny_model, tmp_path: Path, checkpoint: Path, straight: dict, from_step: int):
    model, outcome = run(str(tiny_model), tmp_path / "resumed", resume_from=checkpoint)
    assert outcome.resumed_from_step == from_step and outcome.steps == straight["outcome"].steps
    assert [r["train_loss"] for r in outcome.history] == pytest.approx(
        [r["train_loss"] for r in straight["outcome"].history], rel=1e-5)
    for name, value in trainable(model).items():
        torch.testing.assert_close(value, straight["trainable"][name], rtol=1e-5, atol=1e-7, msg=name)


def test_full_while_checkpointing_fails_clearly_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path, straight):
    sizes = straight["sizes"]  # room for steps 2 and 4 and half of step 6
    room = sizes["step-0000002"] + sizes["step-0000004"] + sizes["step-0000006"] // 2
    outcome, copies = train_on_small_disk(tiny_model, tmp_path, "checkpoints", room)

    error, folder = outcome["error"], tmp_path / "full" / "checkpoints"
    assert error is not None, "training finished although the disk could not hold its checkpoints"
    assert "checkpoint for step 6" in error and "no space left on device" in error, error
    assert f"{folder / 'step-0000004'} (step 4), is intact" in error and "work_dir" in error, error
    assert outcome["checkpoints"] == ["step-0000002", "step-0000004"]  # no half folder keeps the space
    assert outcome["complete"] == {"step-0000002": 2, "step-0000004": 4}
    continues_to_the_same_result(tiny_model, tmp_path, copies / "checkpoint", straight, from_step=4)


def test_full_while_saving_the_best_model_keeps_the_previous_best(tiny_model, tmp_path, straight):
    sizes, best = straight["sizes"], straight["best"]
    # steps 2 and 4's checkpoints, the best model of step 3, and half of a second best model (step 6's)
    room = sizes["step-0000002"] + sizes["step-0000004"] + best + best // 2
    outcome, copies = train_on_small_disk(tiny_model, tmp_path, ".", room)

    error = outcome["error"]
    assert error is not None and "best model so far (step 6)" in error, error
    assert "no space left on device" in error and "previous best model is kept" in error, error
    assert ".best.partial" not in outcome["work"]
    # the best model on disk is step 3's, whole: the same files as the copy in step 4's checkpoint
    assert folder_digest(copies / "best") == folder_digest(copies / "checkpoint" / "best")
    continues_to_the_same_result(tiny_model, tmp_path, copies / "checkpoint", straight, from_step=4)
