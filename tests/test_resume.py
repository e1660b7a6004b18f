"""A training process killed mid-run continues from its last checkpoint to the same result."""
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resume_worker import run
from tasks.engine.checkpoints import read_checkpoint_manifest


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("full_bf16", [False, True], ids=["lora", "full-bf16"])
def test_a_killed_run_resumes_to_the_same_result(tiny_model, tmp_path, full_bf16):
    """LoRA with dropout, and bf16 full fine-tuning, whose AdamW rounds at random: the checkpoint's random
    state makes the resumed steps draw what the straight run draws."""
    worker = Path(__file__).with_name("resume_worker.py")
    killed = subprocess.run([sys.executable, str(worker), str(tiny_model), str(tmp_path / "killed"),
                             "--kill-in-step", "6", *(["--full-bf16"] if full_bf16 else [])],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert saved == ["step-0000002", "step-0000004"]  # step 6's checkpoint was never written

    resumed_model, resumed = run(str(tiny_model), tmp_path / "killed",
                                 resume_from=tmp_path / "killed" / "checkpoints" / "step-0000004", full_bf16=full_bf16)
    straight_model, straight = run(str(tiny_model), tmp_path / "straight", full_bf16=full_bf16)

    assert resumed.resumed_from_step == 4 and straight.resumed_from_step == 0
    assert [r["train_loss"] for r in resumed.history] == pytest.approx(
        [r["train_loss"] for r in straight.history], rel=1e-5)
    assert (resumed.best_step, resumed.trained_tokens) == (straight.best_step, straight.trained_tokens)
    expected = trainable(straight_model)
    for name, value in trainable(resumed_model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_damaged_checkpoint_is_refused(tiny_model, tmp_path):
    run(str(tiny_model), tmp_path)
    checkpoint = tmp_path / "checkpoints" / "step-0000008"
    assert read_checkpoint_manifest(checkpoint)["step"] == 8
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    with open(damaged / "optimizer.pt", "r+b") as handle:  # flip a byte, as a bad disk or partial copy would
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert read_checkpoint_manifest(damaged) is None
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        run(str(tiny_model), tmp_path / "again", resume_from=damaged)
