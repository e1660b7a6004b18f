"""The overfitting signal on crafted curves, and the loss-curve PNG."""
import struct

import pytest

from tasks.reports.loss_curve import plot_loss_curve
from tasks.scoring.overfitting import overfitting_warning


def history(train: list[float], evals: dict[int, float]) -> list[dict]:
    return [{"step": s, "train_loss": t, **({"eval_loss": evals[s]} if s in evals else {})}
            for s, t in enumerate(train, start=1)]


def test_divergence_is_flagged_only_when_train_falls_and_eval_rises_past_the_tolerance():
    falling = [3.0, 2.5, 2.0, 1.6, 1.2, 0.9]
    diverging = overfitting_warning(history(falling, {2: 2.4, 4: 2.0, 6: 2.5}))
    assert diverging.startswith("possible overfitting: eval loss rose from 2.0000 (step 4) to 2.5000 (step 6, +25%)")
    assert "train loss fell from 1.8000 to 1.0500" in diverging
    assert overfitting_warning(history(falling, {2: 2.4, 4: 2.0, 6: 2.1})) is None  # +5%: within tolerance
    assert overfitting_warning(history(falling, {2: 2.4, 4: 2.0, 6: 1.9})) is None  # still improving
    unstable = [3.0, 2.5, 2.0, 1.6, 2.2, 2.8]  # both losses rose: divergence of training, not overfitting
    assert overfitting_warning(history(unstable, {2: 2.4, 4: 2.0, 6: 2.5})) is None
    assert overfitting_warning(history(falling, {6: 9.0})) is None  # one evaluation: nothing to compare


def test_loss_curve_png(tmp_path):
    path = plot_loss_curve(history([3.0, 2.5, 2.0, 1.6], {2: 2.4, 4: 2.1}), tmp_path / "run" / "loss_curve.png",
                           best_step=4, title="tiny lora")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (800, 450)  # width, height from the IHDR chunk
    with pytest.raises(ValueError, match="no training history"):
        plot_loss_curve([], tmp_path / "empty.png")
