"""A DPO run with LoRA killed mid-training continues from its last checkpoint to the same result as a run
that never stopped: the pair order, the random state (LoRA dropout), the best-model tracking and the
preference eval all carry over, and the reference log-prob cache, which a checkpoint does not hold, is
rebuilt from the adapter-disabled model to the same values."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resume_worker import run
from test_resume import trainable


def test_a_killed_dpo_run_resumes_to_the_same_result(tiny_model, tmp_path):
    worker = Path(__file__).with_name("resume_worker.py")
    killed = subprocess.run([sys.executable, str(worker), str(tiny_model), str(tmp_path / "killed"),
                             "--objective", "dpo", "--kill-in-step", "6"], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert saved == ["step-0000002", "step-0000004"]  # step 6's checkpoint was never written

    resumed_model, resumed, resumed_dpo = run(str(tiny_model), tmp_path / "killed", objective="dpo",
                                              resume_from=tmp_path / "killed" / "checkpoints" / "step-0000004")
    straight_model, straight, straight_dpo = run(str(tiny_model), tmp_path / "straight", objective="dpo")

    assert resumed.resumed_from_step == 4 and straight.resumed_from_step == 0
    assert len(resumed.history) == len(straight.history) == 8
    for key in ("train_loss", "reward_accuracy", "reward_margin"):
        assert [r[key] for r in resumed.history] == pytest.approx([r[key] for r in straight.history], rel=1e-5,
                                                                 abs=1e-6), key
    evals = [(r["step"], r["eval_loss"]) for r in straight.history if "eval_loss" in r]
    assert [s for s, _ in evals] == [3, 6, 8]
    assert [s for s, _ in evals] == [r["step"] for r in resumed.history if "eval_loss" in r]
    assert [r["eval_loss"] for r in resumed.history if "eval_loss" in r] == pytest.approx([v for _, v in evals],
                                                                                        rel=1e-5)
    assert (resumed.best_step, resumed.trained_tokens) == (straight.best_step, straight.trained_tokens)
    assert straight.history[-1]["train_loss"] < straight.history[0]["train_loss"] - 0.2  # it learns, unsaturated
    expected = trainable(straight_model)
    for name, value in trainable(resumed_model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # the cache is not in the checkpoint: the resumed process rebuilt it, for the pairs of steps 5-8 and the eval
    # pairs, to the straight run's values (the reference is the adapter switched off, whatever it has learnt)
    assert 10 < len(resumed_dpo.cache) < len(straight_dpo.cache)
    assert resumed_dpo.cache.keys() <= straight_dpo.cache.keys()
    for key, value in resumed_dpo.cache.items():
        assert value == pytest.approx(straight_dpo.cache[key], rel=1e-6, abs=1e-5)
