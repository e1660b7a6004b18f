"""The loss-curve PNG saved next to the published model: train loss per step, eval loss per evaluation."""
from __future__ import annotations

import base64
from pathlib import Path

LOSS_CURVE_NAME = "loss_curve.png"


def plot_loss_curve(history: list[dict], path: Path, best_step: int | None = None, title: str = "") -> Path:
    """Write the PNG to `path` (matplotlib's headless Agg backend: workers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("no training history to plot: the run trained no step")
    evals = [r for r in history if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        axes.plot([r["step"] for r in history], [r["train_loss"] for r in history], label="train loss",
                  color="tab:blue", linewidth=1.2)
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], label="eval loss",
                  color="tab:orange", marker="o", linewidth=1.5)
        if best_step:
            axes.axvline(best_step, color="tab:green", linestyle="--", linewidth=1, label=f"best (step {best_step})")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss (answer tokens)")
        axes.set_title(title or "training and held-out loss")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path


def loss_curve_markdown(png: bytes, title: str, location: str) -> str:
    """The PNG inside markdown, as a data: URI. Both Prefect UIs render it on the artifact's page (checked in
    Chromium: tests/test_ui_artifacts.py), and unlike an image artifact's URL it needs no link that expires
    and no bucket the browser can reach."""
    encoded = base64.b64encode(png).decode("ascii")
    return f"## {title}\n\n![loss curve](data:image/png;base64,{encoded})\n\nThe same PNG: `{location}`."
