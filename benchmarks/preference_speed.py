"""DPO / ORPO tokens/s and peak memory of this project's engine, on a random-init Llama shape (GPU).

The engine's entry point is tasks.engine.train_loop.train(..., objective=PreferenceObjective(...)), with
PairExample pairs (tasks/data/preference.py): what the flow's train task calls for `objective: dpo`.
Pairs here are random tokens: a prompt shared by both sides (masked) and two answers, lengths drawn
log-normal (median ~220 tokens per side, as benchmarks/training_speed.py's chat rows). One case per call:

    python benchmarks/preference_speed.py --shape llama-8b --method lora --pairs-per-step 8 --capacity 8192
    python benchmarks/preference_speed.py --shape llama-8b --method qlora --objective dpo --checkpointing on

Prints one JSON line: processed tokens/s (both sides whole, no padding: a shared prompt counts twice, as
TRL's batch holds it), peak GiB, the reference passes, whether the prompts were shared.
TRL's DPOTrainer on the same pairs is the lead's comparison (not here).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def random_pairs(count: int, vocab_size: int, seed: int = 0) -> list:
    from tasks.data.preference import PairExample
    from tasks.data.tokenization import IGNORE_INDEX, Example

    rng = random.Random(seed)

    def length(median: int, cap: int) -> int:
        return max(8, min(cap, int(rng.lognormvariate(0, 0.8) * median)))

    pairs = []
    for _ in range(count):
        prompt = [rng.randrange(vocab_size) for _ in range(length(120, 1024))]
        sides = []
        for _ in range(2):
            answer = [rng.randrange(vocab_size) for _ in range(length(100, 1024))]
            sides.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, False))
        pairs.append(PairExample(*sides))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-8b", help="a shape of benchmarks/seed_recipe.py SHAPES")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    parser.add_argument("--objective", default="dpo", choices=["dpo", "orpo"])
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=8192, help="packed tokens per micro-batch")
    parser.add_argument("--checkpointing", default="off", choices=["on", "off"])
    parser.add_argument("--steps", type=int, default=11, help="the first 3 are warm-up, not timed")
    parser.add_argument("--share-prompts", default="on", choices=["on", "off"],
                        help="on: a pair's prompt runs once where the model allows it (the engine's default); "
                        "off: both sides whole")
    args = parser.parse_args()

    from training_speed import random_model

    from tasks.engine.preference import SHARES_PROMPTS, shares_prompts
    from tasks.engine.preference_training import PreferenceObjective
    from tasks.engine.train_loop import train
    from tasks.planning.settings import PreferenceSettings, TrainingSettings

    if args.objective == "dpo" and args.method == "full":
        sys.exit("full DPO needs a reference copy: benchmark lora or qlora (or orpo)")
    model = random_model(args.shape, args.method, args.checkpointing == "on")
    if args.share_prompts == "off":
        setattr(model, SHARES_PROMPTS, False)
    pairs = random_pairs(args.pairs_per_step * args.steps + 2, model.config.vocab_size)
    objective = PreferenceObjective(args.objective, PreferenceSettings(), "cuda")
    settings = TrainingSettings(max_steps=args.steps, batch_size=args.pairs_per_step, max_seq_len=4096,
                                eval_every=10_000, early_stopping_patience=0, learning_rate=1e-5,
                                lr_schedule="constant")
    with tempfile.TemporaryDirectory() as scratch:
        outcome = train(model, pairs[2:], pairs[:2], settings, args.capacity, "cuda", Path(scratch) / "best",
                        logging.getLogger("bench"), progress=False, objective=objective)
    timed = outcome.history[3:]
    print(json.dumps({**vars(args), "tokens_per_s": round(sum(r["tokens"] for r in timed) /
                                                          sum(r["seconds"] for r in timed)),
                      "peak_gib": round(outcome.peak_memory_bytes / 2**30, 2),
                      "peak_allocated_gib": round(outcome.peak_allocated_bytes / 2**30, 2),
                      "reference_passes": objective.reference_passes,
                      "shared_prompts": shares_prompts(model, "cuda")}))


if __name__ == "__main__":
    main()
