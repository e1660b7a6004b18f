"""Trains the tiny model with checkpoints; with --kill-in-step N it SIGKILLs itself inside step N.
With --objective dpo|orpo it trains on the demo's preference pairs instead of its chat rows; with
--full-bf16 it fine-tunes every weight in bf16 (full_precision bf16: the stochastically rounding AdamW).

Run as a separate process by tests/test_resume.py and tests/test_preference_resume.py: a kill -9 leaves
no chance to clean up, like a preempted GPU node or an out-of-memory kill.
"""
import argparse
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tasks.engine.train_loop as trainer  # noqa: E402
from tasks.config import LoraSettings, PreferenceSettings, TrainingSettings  # noqa: E402
from tasks.data.preference import encode_pairs, read_preferences  # noqa: E402
from tasks.data.tokenization import encode_all, load_tokenizer  # noqa: E402
from tasks.data.validation import read_dataset  # noqa: E402
from tasks.engine.modeling import load_for_training  # noqa: E402
from tasks.engine.preference_training import PreferenceObjective  # noqa: E402

DEMO_DATA = Path(__file__).resolve().parent.parent / "demo" / "data"
SETTINGS = TrainingSettings(learning_rate=1e-2, lr_schedule="cosine", warmup_steps=2, max_steps=8, batch_size=6,
                            eval_every=3, early_stopping_patience=0, checkpoint_every=2, seed=3)
LORA = LoraSettings(r=4, dropout=0.1)  # dropout: the random state must be restored too
# DPO learns the demo pairs' one-word difference in a step or two at 1e-2: slower, so every step still moves
PREFERENCE = SETTINGS.model_copy(update={"learning_rate": 1e-3})


def run(model_dir: str, work: Path, resume_from: Path | None = None, kill_in_step: int | None = None,
        objective: str = "sft", full_bf16: bool = False):
    """Returns (model, outcome), and for dpo/orpo the PreferenceObjective (its reference cache) too."""
    tokenizer = load_tokenizer(model_dir)
    preference = None
    if objective == "sft":
        train_rows = encode_all(tokenizer, read_dataset(str(DEMO_DATA / "train.jsonl")).conversations, 96)
        eval_rows = encode_all(tokenizer, read_dataset(str(DEMO_DATA / "eval.jsonl")).conversations, 96)
    else:
        train_rows, eval_rows = (encode_pairs(tokenizer, read_preferences(str(DEMO_DATA / name)).pairs, 96)
                                 for name in ("preference_train.jsonl", "preference_eval.jsonl"))
        preference = PreferenceObjective(objective, PreferenceSettings(beta=0.1), "cpu")
    torch.manual_seed(SETTINGS.seed)
    model = (load_for_training(model_dir, "full", "cpu", LORA, False, full_precision="bf16") if full_bf16
             else load_for_training(model_dir, "lora", "cpu", LORA, False))
    if kill_in_step is not None:
        _die_in_step(kill_in_step, preference)
    checkpoints = trainer.Checkpoints(folder=work / "checkpoints", every=SETTINGS.checkpoint_every, keep=10,
                                      resume_from=resume_from)
    outcome = trainer.train(model, train_rows, eval_rows, SETTINGS if preference is None else PREFERENCE, 4 * 96,
                            "cpu", work / "best",
                            logging.getLogger("resume"), checkpoints, progress=False, objective=preference)
    return (model, outcome) if preference is None else (model, outcome, preference)


def _die_in_step(step: int, preference: PreferenceObjective | None) -> None:
    """SIGKILL this process as step `step` starts its backward (sft or preference)."""
    owner, name = (trainer, "accumulate_gradients") if preference is None else (preference, "accumulate")
    calls, accumulate = [0], getattr(owner, name)

    def accumulate_then_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return accumulate(*args, **kwargs)
    setattr(owner, name, accumulate_then_die)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("work", type=Path)
    parser.add_argument("--kill-in-step", type=int)
    parser.add_argument("--objective", default="sft", choices=["sft", "dpo", "orpo"])
    parser.add_argument("--full-bf16", action="store_true")
    args = parser.parse_args()
    run(args.model_dir, args.work, kill_in_step=args.kill_in_step, objective=args.objective, full_bf16=args.full_bf16)
