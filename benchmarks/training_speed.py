"""Useful tokens/s and peak memory: the seed recipe and this project's engine, same GPU, shapes, data.

The seed recipe is benchmarks/seed_recipe.py (HF Trainer + peft + bitsandbytes, padding per batch).
Ours is tasks/trainer.train: packed rows, varlen attention, fused loss. Both train random-init Llama
shapes on the same random token rows: full-length rows (2048 tokens) or chat rows whose lengths
follow the log-normal mix of ANCHORS.md; every token is a target, as in the seed harness. Each case
runs in its own process so none inherits another's memory. Run on a CUDA machine:

    python benchmarks/training_speed.py run --recipes seed ours --out results.jsonl
    python benchmarks/training_speed.py summary results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PEAK_BF16_FLOPS = 790e12  # measured 8192^3 bf16 matmul on the H200 (ANCHORS.md, KINDS.md)
SEQ = 2048
# (shape, method, rows per optimizer step, the seed's gradient checkpointing, data), as in ANCHORS.md;
# the 1B chat cases use the 8B chat cases' 8 rows per step.
CASES = [
    ("llama-1b", "full", 4, False, "fixed"), ("llama-1b", "lora", 4, False, "fixed"),
    ("llama-8b", "lora", 2, True, "fixed"), ("llama-8b", "qlora", 2, True, "fixed"),
    ("llama-1b", "full", 8, False, "chat"), ("llama-1b", "lora", 8, False, "chat"),
    ("llama-8b", "lora", 8, True, "chat"), ("llama-8b", "qlora", 8, True, "chat"),
]
UNSLOTH = {  # ANCHORS.md: Unsloth 2026.10.9 on the same GPU (useful tok/s, peak GiB)
    ("llama-8b", "lora", "fixed"): (9682, 16.7), ("llama-8b", "lora", "chat"): (3053, 19.2),
    ("llama-8b", "qlora", "fixed"): (9874, 7.0), ("llama-8b", "qlora", "chat"): (2863, 9.5),
}
WARM_STEPS, TIMED_STEPS = 3, 8


def run_seed(shape: str, method: str, rows: int, checkpointing: bool, data: str) -> dict:
    import seed_recipe

    result = seed_recipe.run(shape=shape, method=method, seq=SEQ, bs=rows, steps=TIMED_STEPS, gc=checkpointing,
                             r=16, targets="all-linear", literal=False, lengths=data)
    return {"useful_tokens_per_s": result.get("useful_tokens_per_s"), "peak_gib": result.get("peak_gib"),
            "error": result.get("error"), "grad_ckpt": checkpointing, "rows_per_step": rows}


def random_model(shape: str, method: str, checkpointing: bool, lora_dropout: float = 0.05,
                 full_precision: str = "fp32"):
    """A random-init Llama of `shape` on the current CUDA device, prepared for `method` as the train
    task prepares a loaded one (tasks/engine/modeling.py). Also used by benchmarks/multi_gpu_scaling.py."""
    import torch
    from gpu_memory import checkpoint_for
    from seed_recipe import SHAPES
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.config import LoraSettings
    from tasks.engine.modeling import _load_4bit, prepare_for_training

    torch.cuda.empty_cache()
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    if method == "qlora":
        model = _load_4bit(str(checkpoint_for(shape, Path(tempfile.gettempdir()))), "cuda")
    else:  # full fine-tuning keeps fp32 master weights unless bf16; LoRA freezes a bf16 base (tasks/engine/modeling.py)
        torch.set_default_dtype(torch.float32 if method == "full" and full_precision == "fp32" else torch.bfloat16)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    lora = LoraSettings(r=16, alpha=32, dropout=lora_dropout)  # by default the seed's adapter
    return prepare_for_training(model, method, "cuda", lora, checkpointing)


def random_examples(count: int, vocab_size: int, data: str) -> list:
    """`count` random token rows, every token a target: full-length ("fixed") or chat-length ("chat")."""
    from seed_recipe import Rand

    from tasks.data.tokenization import Example

    dataset = Rand(count, SEQ, vocab_size, data)
    return [Example(input_ids=r["input_ids"].tolist(), labels=r["input_ids"].tolist(), truncated=False)
            for r in (dataset[i] for i in range(len(dataset)))]


def run_ours(shape: str, method: str, rows: int, checkpointing: bool, data: str, capacity: int) -> dict:
    import logging

    from tasks.config import TrainingSettings
    from tasks.engine.train_loop import train

    model = random_model(shape, method, checkpointing)
    steps = WARM_STEPS + TIMED_STEPS
    examples = random_examples(rows * steps + 8, model.config.vocab_size, data)
    settings = TrainingSettings(max_steps=steps, batch_size=rows, max_seq_len=SEQ, eval_every=10_000,
                                early_stopping_patience=0, learning_rate=1e-4, lr_schedule="constant")
    with tempfile.TemporaryDirectory() as scratch:
        outcome = train(model, examples[8:], examples[:2], settings, capacity, "cuda", Path(scratch) / "best",
                        logging.getLogger("bench"), progress=False)
    timed = outcome.history[WARM_STEPS:]
    return {"useful_tokens_per_s": round(sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed)),
            "peak_gib": round(outcome.peak_memory_bytes / 2**30, 2), "grad_ckpt": checkpointing,
            "rows_per_step": rows, "token_capacity": capacity, "attention": model.config._attn_implementation}


def one_case(args) -> None:
    shape, method, rows, checkpointing, data = args.case
    rows, checkpointing = int(rows), checkpointing == "True"
    started = time.time()
    try:
        if args.recipe == "seed":
            result = run_seed(shape, method, rows, checkpointing, data)
        else:
            result = run_ours(shape, method, rows, args.ours_ckpt == "on", data, args.capacity)
    except Exception as error:  # an OOM or a failure is a result too
        result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    result = {"recipe": args.label or args.recipe, "shape": shape, "method": method, "data": data, **result,
              "wall_s": round(time.time() - started, 1)}
    print(json.dumps(result), flush=True)
    with open(args.out, "a") as out:
        out.write(json.dumps(result) + "\n")


def run_all(args) -> None:
    for case in CASES:
        shape, method, rows, checkpointing, data = case
        if args.only and f"{shape}:{method}:{data}" not in args.only:
            continue
        for recipe in args.recipes:
            capacity = args.capacity or rows * SEQ  # the micro-batch the planner would size: rows x seq
            command = [sys.executable, __file__, "case", recipe, shape, method, str(rows), str(checkpointing), data,
                       "--out", args.out, "--capacity", str(capacity), "--ours-ckpt", args.ours_ckpt]
            subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if "ours" in args.recipes and not args.only:
        run_token_sized(args)


# Ours again on chat rows with steps sized in tokens rather than in the seed's 8 rows: (shape, method,
# rows per step, packed tokens per micro-batch), the micro-batch kept within the seed's peak memory.
TOKEN_SIZED_STEPS = [("llama-8b", "lora", 32, 4096), ("llama-8b", "qlora", 32, 4096),
                     ("llama-1b", "full", 32, 8192), ("llama-1b", "lora", 32, 8192)]


def run_token_sized(args) -> None:
    for shape, method, rows, capacity in TOKEN_SIZED_STEPS:
        command = [sys.executable, __file__, "case", "ours", shape, method, str(rows), "False", "chat",
                   "--out", args.out, "--capacity", str(capacity), "--label", f"ours-{rows}rows"]
        subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def summary(args) -> None:
    results = [json.loads(line) for line in open(args.results)]
    by = {(r["recipe"], r["shape"], r["method"], r["data"]): r for r in results}
    labels = sorted({r["recipe"] for r in results} - {"seed"})
    print("| shape | method | data | seed tok/s | seed GiB | engine | tok/s | GiB | speed ratio | memory ratio "
          "| MFU | Unsloth tok/s, GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, method, _, _, data in CASES:
        seed = by.get(("seed", shape, method, data))
        for label in labels:
            ours = by.get((label, shape, method, data))
            if not seed or not ours:
                continue
            speed = _ratio(ours.get("useful_tokens_per_s"), seed.get("useful_tokens_per_s"))
            memory = _ratio(ours.get("peak_gib"), seed.get("peak_gib"))
            unsloth = UNSLOTH.get((shape, method, data))
            detail = f"{label} ({ours.get('rows_per_step')} rows/step, {ours.get('token_capacity')} tok/micro-batch)"
            print(f"| {shape} | {method} | {data} | {_fmt(seed)} | {detail} | {_fmt(ours)} | {speed} | {memory} "
                  f"| {_mfu(shape, method, ours.get('useful_tokens_per_s'))} "
                  f"| {f'{unsloth[0]:,}, {unsloth[1]}' if unsloth else '-'} |")


def _fmt(result: dict) -> str:
    if result.get("error"):
        return f"{result['error'][:40]} | -"
    return f"{result['useful_tokens_per_s']:,} | {result['peak_gib']}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _mfu(shape: str, method: str, tokens_per_s) -> str:
    """Model FLOPs utilisation: matmul FLOPs per token (6N full, 4N with a frozen base: no weight
    gradients; attention and recomputation not counted) over the GPU's measured bf16 peak."""
    if not tokens_per_s:
        return "-"
    from seed_recipe import SHAPES

    s = SHAPES[shape]
    h, i, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    matmul_params = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + vocab * h  # the embedding lookup is no matmul
    flops = (6 if method == "full" else 4) * matmul_params
    return f"{tokens_per_s * flops / PEAK_BF16_FLOPS:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    everything = commands.add_parser("run", help="every case, one process each")
    everything.add_argument("--recipes", nargs="+", default=["seed", "ours"], choices=["seed", "ours"])
    everything.add_argument("--only", nargs="*", help="cases as shape:method:data")
    everything.add_argument("--capacity", type=int, default=0, help="our packed tokens per micro-batch")
    everything.add_argument("--ours-ckpt", choices=["on", "off"], default="off")
    everything.add_argument("--out", required=True)
    case = commands.add_parser("case")
    case.add_argument("recipe", choices=["seed", "ours"])
    case.add_argument("case", nargs=5)
    case.add_argument("--capacity", type=int, required=True)
    case.add_argument("--ours-ckpt", choices=["on", "off"], default="off")
    case.add_argument("--label", help="a name for a variant, e.g. ours-32rows")
    case.add_argument("--out", required=True)
    table = commands.add_parser("summary")
    table.add_argument("results")
    args = parser.parse_args()
    {"run": run_all, "case": one_case, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
