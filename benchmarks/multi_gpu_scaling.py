"""Scaling from 1 to 2 GPUs: useful tokens/s, scaling efficiency and peak memory per GPU.

The same global batch (rows per optimizer step) on 1 and on 2 GPUs, each run started by torchrun as
the train task starts it (tasks/engine/launch.py) and trained by this project's trainer with its
`Parallel` (tasks/engine/distributed.py): llama-8b LoRA (DDP) and llama-1b full fine-tuning (FSDP2), random
weights from the config written once to disk and loaded as the train task loads a model
(benchmarks/gpu_memory.py), chat-length rows from benchmarks/training_speed.py.
Scaling efficiency = 2-GPU tokens/s / (2 x 1-GPU tokens/s). Run on a machine with 2 GPUs:

    python benchmarks/multi_gpu_scaling.py run --out scaling.jsonl
    python benchmarks/multi_gpu_scaling.py summary scaling.jsonl
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

# (shape, method, gradient checkpointing, rows per optimizer step (global), packed tokens per micro-batch):
# the token-sized steps of training_speed.py (32 chat rows), so 2 GPUs get 16 rows each.
CASES = [("llama-8b", "lora", True, 32, 4096), ("llama-1b", "full", False, 32, 8192)]
GPU_COUNTS = (1, 2)
WARM_STEPS, TIMED_STEPS = 3, 8


def one_case(args) -> None:
    """Runs in every torchrun process; rank 0 writes the result line."""
    import logging

    import torch
    from gpu_memory import checkpoint_for
    from training_speed import random_examples

    from tasks.config import LoraSettings, TrainingSettings
    from tasks.engine.distributed import join_process_group, leave_process_group
    from tasks.engine.train_loop import train

    from tasks.engine.modeling import load_for_training, use_expandable_segments

    use_expandable_segments("cuda")  # as the train task's model loading does; before any CUDA allocation
    parallel = join_process_group("cuda")
    # Random weights written once to disk (rank 0 first), then loaded as the train task loads a model.
    if parallel.is_main:
        path = checkpoint_for(args.shape, Path(tempfile.gettempdir()))
    parallel.barrier()
    path = checkpoint_for(args.shape, Path(tempfile.gettempdir()))
    torch.manual_seed(0)  # the same LoRA initialisation on every GPU
    model = load_for_training(str(path), args.method, "cuda", LoraSettings(r=16, alpha=32, dropout=0.05),
                              args.checkpointing == "on")
    steps = WARM_STEPS + TIMED_STEPS
    examples = random_examples(args.rows * steps + 8, model.config.vocab_size, "chat")
    settings = TrainingSettings(max_steps=steps, batch_size=args.rows, max_seq_len=2048, eval_every=10_000,
                                early_stopping_patience=0, learning_rate=1e-5, lr_schedule="constant")
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        outcome = train(model, examples[8:], examples[:2], settings, args.capacity, "cuda", Path(scratch) / "best",
                        logging.getLogger("bench"), progress=False, parallel=parallel)
    peaks = parallel.gather(round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if parallel.is_main:
        timed = outcome.history[WARM_STEPS:]  # `tokens` counts the whole step's rows, on every process
        result = {"shape": args.shape, "method": args.method, "gpus": parallel.world_size,
                  "engine": "FSDP2" if parallel.sharded else ("DDP" if parallel.distributed else "one GPU"),
                  "rows_per_step": args.rows, "token_capacity": args.capacity, "grad_ckpt": args.checkpointing,
                  "useful_tokens_per_s": round(sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed)),
                  "peak_gib_per_gpu": peaks, "final_loss": outcome.history[-1]["train_loss"],
                  "wall_s": round(time.time() - started, 1), "device": torch.cuda.get_device_name()}
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as out:
            out.write(json.dumps(result) + "\n")
    leave_process_group()


def run_all(args) -> None:
    for shape, method, checkpointing, rows, capacity in CASES:
        for gpus in args.gpus:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                       __file__, "case", shape, method, "--rows", str(rows), "--capacity", str(capacity),
                       "--checkpointing", "on" if checkpointing else "off", "--out", args.out]
            finished = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
            if finished.returncode:
                with open(args.out, "a") as out:
                    out.write(json.dumps({"shape": shape, "method": method, "gpus": gpus,
                                          "error": f"torchrun exit code {finished.returncode}"}) + "\n")
    summary(argparse.Namespace(results=args.out))


def summary(args) -> None:
    results = [json.loads(line) for line in open(args.results)]
    by = {(r["shape"], r["method"], r["gpus"]): r for r in results}
    print("| shape | method | engine (2 GPUs) | rows/step | 1-GPU tok/s | 2-GPU tok/s | scaling efficiency "
          "| peak GiB per GPU, 1 GPU | peak GiB per GPU, 2 GPUs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, method, _, rows, _ in CASES:
        one, two = by.get((shape, method, 1), {}), by.get((shape, method, 2), {})
        speed = [r.get("useful_tokens_per_s") for r in (one, two)]
        efficiency = f"{speed[1] / (2 * speed[0]):.0%}" if all(speed) else "-"
        print(f"| {shape} | {method} | {two.get('engine', two.get('error', '-'))} | {rows} "
              f"| {speed[0] or one.get('error', '-')} | {speed[1] or two.get('error', '-')} | {efficiency} "
              f"| {one.get('peak_gib_per_gpu', '-')} | {two.get('peak_gib_per_gpu', '-')} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    everything = commands.add_parser("run", help="every case on 1 and on 2 GPUs, one torchrun each")
    everything.add_argument("--out", required=True)
    everything.add_argument("--gpus", type=int, nargs="+", default=list(GPU_COUNTS),
                            help="GPU counts to run (default 1 2); 1 alone on a one-GPU machine")
    case = commands.add_parser("case", help="one case, in each torchrun process")
    case.add_argument("shape")
    case.add_argument("method", choices=["full", "lora", "qlora"])
    case.add_argument("--rows", type=int, required=True)
    case.add_argument("--capacity", type=int, required=True)
    case.add_argument("--checkpointing", choices=["on", "off"], default="off")
    case.add_argument("--out", required=True)
    table = commands.add_parser("summary")
    table.add_argument("results")
    args = parser.parse_args()
    {"run": run_all, "case": one_case, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
