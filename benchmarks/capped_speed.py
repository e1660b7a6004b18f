"""Speed at a memory budget (issue 17): ours as planned for 24/48/80 GiB GPUs beside Unsloth at its
best there, and beside the seed recipe on the seed's own cases.

Each cap stands for a GPU of that size: `torch.cuda.set_per_process_memory_fraction`, the same call
for every recipe, and peaks counted the same way for all (the allocator's peak allocation). Ours
trains what the planner picks for the cap (tasks/planning/selector.py, with 90% of the cap as its
budget, as for a work pool of that GPU) on about Unsloth's tokens per optimizer step: 27 chat rows
average 8.1k tokens; Unsloth packs 4 bins of up to 2048 a step (benchmarks/unsloth_peer.py). Both
train the same adapter: r=16, alpha 32, dropout 0 (Unsloth's fast path needs it). Rows
follow ANCHORS.md's chat-length mix. One process per recipe and method loads the model once and
trains at each cap in turn. Run on a CUDA machine, all in one call per comparison:

    python benchmarks/capped_speed.py run --out results.jsonl        # ours and Unsloth at every cap
    python benchmarks/capped_speed.py seed --out results.jsonl       # the seed's 8B QLoRA and 1B full cases
    python benchmarks/capped_speed.py sweep --method lora --out sweep.jsonl   # the planner's speed model
    python benchmarks/capped_speed.py summary results.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from training_speed import SEQ, _mfu, random_examples, run_seed  # noqa: E402

CAPS_GIB = (24, 48, 80)
ROWS_LIKE_UNSLOTH = 27  # chat rows average 300 tokens: 8.1k a step, as Unsloth's 4 packed bins
WARM_STEPS, TIMED_STEPS = 3, 10
SEED_CASES = [("llama-8b", "qlora", 8, True, "chat"), ("llama-1b", "full", 4, False, "fixed")]


def plan_for_cap(shape: str, method: str, examples: list, rows: int, cap_gib: float, full_precision: str = "auto"):
    """What the planner picks for `method` on a GPU of `cap_gib` (90% of it, as for a work pool of that GPU)."""
    from gpu_memory import SHAPES as CONFIGS

    from tasks.planning.memory import GIB, ModelShape
    from tasks.planning.selector import GPU_SAFETY, select_plan, step_tokens

    lengths = [len(e.input_ids) for e in examples]
    largest, typical = step_tokens(lengths, rows)
    return select_plan(ModelShape.from_config(CONFIGS[shape]), budget_bytes=int(GPU_SAFETY * cap_gib * GIB),
                       budget_source=f"{GPU_SAFETY:.0%} of a {cap_gib:g} GiB cap", device="cuda", method=method,
                       longest_row=max(lengths), largest_step=largest, typical_step=typical,
                       full_precision=full_precision)


def timed_training(model, examples: list, rows: int, capacity: int, steps: tuple[int, int] = (WARM_STEPS, TIMED_STEPS)):
    """Train `sum(steps)` steps of `rows` rows; useful tokens/s over the timed ones and the peak allocation."""
    import torch

    from tasks.config import TrainingSettings
    from tasks.engine.train_loop import train

    warm, timed = steps
    settings = TrainingSettings(max_steps=warm + timed, batch_size=rows, max_seq_len=SEQ, eval_every=10_000,
                                early_stopping_patience=0, learning_rate=1e-4, lr_schedule="constant")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as scratch:
        outcome = train(model, examples[8:], examples[:2], settings, capacity, "cuda", Path(scratch) / "best",
                        logging.getLogger("bench"), progress=False)
    history = outcome.history[warm:]
    tokens, seconds = sum(r["tokens"] for r in history), sum(r["seconds"] for r in history)
    return {"useful_tokens_per_s": round(tokens / seconds), "tokens_per_step": round(tokens / len(history)),
            "step_s": round(seconds / len(history), 4), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def ours(args) -> None:
    """Ours for one shape and method, loaded once, at each cap as planned for it."""
    from training_speed import random_model
    from unsloth_peer import cap_memory

    from tasks.engine.modeling import checkpoint_layers

    examples = random_examples(args.rows * (WARM_STEPS + TIMED_STEPS) + 8, _vocab(args.shape), args.data)
    model = None
    for cap in args.caps:
        started = time.time()
        try:
            plan = plan_for_cap(args.shape, args.method, examples[8:], args.rows, cap, args.full_precision)
            layers = plan.checkpointed_layers if plan.gradient_checkpointing else 0
            if model is None:
                model = random_model(args.shape, plan.method.value, plan.gradient_checkpointing, lora_dropout=0.0,
                                     full_precision=plan.estimate.full_precision)
            checkpoint_layers(model, layers)
            cap_memory(cap)
            result = {"planned_gib": round(plan.estimate.gib, 2), "token_capacity": plan.tokens_per_micro_batch,
                      "full_precision": plan.estimate.full_precision,
                      "checkpointed_layers": plan.estimate.checkpointed_layers, "plan": plan.reason,
                      **timed_training(model, examples, args.rows, plan.tokens_per_micro_batch)}
        except Exception as error:  # an OOM or a failure is a result too
            result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        _emit(args.out, {"recipe": args.label, "shape": args.shape, "method": args.method, "data": args.data,
                         "cap_gib": cap, "rows_per_step": args.rows, **result, "wall_s": round(time.time() - started, 1)})


def sweep(args) -> None:
    """Ours, uncapped, over micro-batch sizes and checkpointed layers: the figures the planner's speed
    model (MICRO_BATCH_OVERHEAD_TOKENS, RECOMPUTE_SHARE) is fitted to, and the estimate beside each peak."""
    from gpu_memory import SHAPES as CONFIGS
    from training_speed import random_model

    from tasks.engine.modeling import checkpoint_layers
    from tasks.planning.memory import ModelShape, estimate_memory

    examples = random_examples(args.rows * 8 + 8, _vocab(args.shape), args.data)
    model = random_model(args.shape, args.method, True, lora_dropout=0.0)
    shape = ModelShape.from_config(CONFIGS[args.shape])
    for capacity in args.capacities:
        for layers in args.layers:
            started = time.time()
            try:
                checkpoint_layers(model, layers)
                result = timed_training(model, examples, args.rows, capacity, steps=(2, 4))
                estimate = estimate_memory(shape, args.method, "cuda", capacity, layers > 0, checkpointed_layers=layers)
                result["estimated_gib"] = round(estimate.gib, 2)
            except Exception as error:
                result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            _emit(args.out, {"recipe": "ours-sweep", "shape": args.shape, "method": args.method, "data": args.data,
                             "token_capacity": capacity, "checkpointed_layers": layers, "rows_per_step": args.rows,
                             **result, "wall_s": round(time.time() - started, 1)})


def run(args) -> None:
    """Ours and Unsloth, each method at every cap, one process per recipe and method."""
    for method in args.methods:
        _python(__file__, "ours", "--method", method, "--caps", *map(str, args.caps), "--out", args.out)
        if "unsloth" in args.recipes:
            _python(HERE / "unsloth_peer.py", "--method", method, "--caps", *map(str, args.caps), "--out", args.out)


def seed(args) -> None:
    """The seed's 8B QLoRA at its 8 rows/step beside ours (uncapped, as planned for the whole GPU), and
    the seed's 1B full fine-tuning beside ours capped at the seed's own peak: as planned (auto: bf16
    weights there) and with fp32 master weights forced (what it was before full_precision)."""
    for case in SEED_CASES:
        if case[1] in args.methods:
            _python(HERE / "training_speed.py", "case", "seed", *map(str, case), "--out", args.out, "--capacity", "0")
    if "qlora" in args.methods:
        _python(__file__, "ours", "--method", "qlora", "--rows", "8", "--caps", "141", "--label", "ours-8rows",
                "--out", args.out)
    if "full" not in args.methods:
        return
    peaks = [r.get("peak_gib") for r in map(json.loads, open(args.out)) if r.get("recipe") == "seed"
             and (r["shape"], r["method"]) == ("llama-1b", "full")]
    for label, precision in (("ours-at-seed-peak", "auto"), ("ours-at-seed-peak-fp32", "fp32")):
        _python(__file__, "ours", "--shape", "llama-1b", "--method", "full", "--rows", "4", "--data", "fixed",
                "--caps", str(peaks[-1] or 33.6), "--label", label, "--full-precision", precision, "--out", args.out)


def summary(args) -> None:
    results = [json.loads(line) for line in open(args.results)]
    unsloth = [r for r in results if r["recipe"] == "unsloth" and not r.get("error")]

    def best_peer(method: str, cap: float) -> dict:
        """Unsloth at its best for the cap: its fastest run of the method whose peak fits the cap (its
        configuration does not change with the cap, so a run at a larger cap counts where it fits)."""
        fitting = [r for r in unsloth if r["method"] == method and r["peak_gib"] <= cap]
        return max(fitting, key=lambda r: r["useful_tokens_per_s"], default={})

    print("| case | cap GiB | ours tok/s | ours peak GiB | planned | Unsloth tok/s | Unsloth peak GiB | ours / Unsloth "
          "| ours MFU | Unsloth MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["recipe"] != "ours":
            continue
        peer = best_peer(r["method"], r["cap_gib"])
        ratio = _ratio(r.get("useful_tokens_per_s"), peer.get("useful_tokens_per_s"))
        planned = (f"{r.get('token_capacity')} tok/micro-batch, ckpt {r.get('checkpointed_layers')} layers"
                   if not r.get("error") else r["error"][:60])
        print(f"| {r['shape']} {r['method']} {r['data']} | {r['cap_gib']:g} | {r.get('useful_tokens_per_s', '-')} "
              f"| {r.get('peak_gib', '-')} | {planned} | {peer.get('useful_tokens_per_s', '-')} "
              f"| {peer.get('peak_gib', '-')} | {ratio} | {_mfu(r['shape'], r['method'], r.get('useful_tokens_per_s'))} "
              f"| {_mfu(r['shape'], r['method'], peer.get('useful_tokens_per_s'))} |")
    seeds = {(r["shape"], r["method"]): r for r in results if r["recipe"] == "seed"}
    for label in ("ours-8rows", "ours-at-seed-peak", "ours-at-seed-peak-fp32"):
        for r in (r for r in results if r["recipe"] == label):
            base = seeds.get((r["shape"], r["method"]), {})
            print(f"| {r['shape']} {r['method']} {r['data']} ({label}) vs seed | {r['cap_gib']:g} "
                  f"| {r.get('useful_tokens_per_s', '-')} | {r.get('peak_gib', '-')} | seed {base.get('useful_tokens_per_s')} "
                  f"tok/s @ {base.get('peak_gib')} GiB | | | "
                  f"{_ratio(r.get('useful_tokens_per_s'), base.get('useful_tokens_per_s'))} of seed "
                  f"| {_mfu(r['shape'], r['method'], r.get('useful_tokens_per_s'))} | |")


def _vocab(shape: str) -> int:
    from seed_recipe import SHAPES

    return SHAPES[shape]["vocab_size"]


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _emit(out: str, result: dict) -> None:
    print(json.dumps(result), flush=True)
    with open(out, "a") as file:
        file.write(json.dumps(result) + "\n")


def _python(*command) -> None:
    subprocess.run([sys.executable, *map(str, command)], check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _training_case(parser):
    """What one of our training processes is given: the model, method, rows per step, data, output."""
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--method", required=True)
    parser.add_argument("--rows", type=int, default=ROWS_LIKE_UNSLOTH)
    parser.add_argument("--data", default="chat")
    parser.add_argument("--out", required=True)
    return parser


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "seed"):
        command = commands.add_parser(name)
        command.add_argument("--caps", type=float, nargs="+", default=list(CAPS_GIB))
        command.add_argument("--methods", nargs="+", default=["lora", "qlora"] if name == "run" else ["qlora", "full"])
        command.add_argument("--recipes", nargs="+", default=["ours", "unsloth"])
        command.add_argument("--out", required=True)
    one = _training_case(commands.add_parser("ours"))
    one.add_argument("--caps", type=float, nargs="+", default=list(CAPS_GIB))
    one.add_argument("--label", default="ours")
    one.add_argument("--full-precision", default="auto", choices=["auto", "fp32", "bf16"])
    grid = _training_case(commands.add_parser("sweep"))
    grid.add_argument("--capacities", type=int, nargs="+", default=[2048, 8192, 16384])
    grid.add_argument("--layers", type=int, nargs="+", default=[0, 16, 32])
    table = commands.add_parser("summary")
    table.add_argument("results")
    args = parser.parse_args()
    {"run": run, "seed": seed, "ours": ours, "sweep": sweep, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
