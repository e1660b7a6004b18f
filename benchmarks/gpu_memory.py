"""Measured vs estimated peak training memory on a GPU, through this project's own trainer.

Random-init Llama shapes (as in ../shared/bench/ANCHORS.md), full-length rows whose every token
is trained (the estimator's worst case), a few optimizer steps per case, one case per process
state reset. Prints one JSON line per case and a table; run it on a CUDA machine:

    python benchmarks/gpu_memory.py --shapes llama-1b --out results.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tasks.config import LoraSettings, TrainingSettings  # noqa: E402
from tasks.memory import GIB, ModelShape, estimate_memory  # noqa: E402
from tasks.modeling import load_for_training  # noqa: E402
from tasks.tokenization import Example  # noqa: E402
from tasks.trainer import train  # noqa: E402

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}
CASES = {  # shape -> (method, micro-batch, gradient checkpointing)
    "llama-1b": [("full", 4, False), ("full", 4, True), ("lora", 4, False), ("lora", 4, True),
                 ("qlora", 4, False), ("qlora", 4, True)],
    "llama-8b": [("lora", 2, True), ("qlora", 2, True)],
}
SEQ = 2048
STEPS = 4


def checkpoint_for(shape: str, root: Path) -> Path:
    """A random bf16 checkpoint of `shape` (4-bit loading needs one on disk: bitsandbytes quantizes
    while loading); named as benchmarks/seed_recipe.py names its own, so a machine writes it once."""
    path = root / f"anchor-{shape}"
    if not (path / "config.json").exists():
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def run_case(shape: str, path: Path, method: str, micro_batch: int, checkpointing: bool) -> dict:
    torch.cuda.empty_cache()
    lora = LoraSettings(r=16, alpha=32, dropout=0.05)
    model = load_for_training(str(path), method, "cuda", lora, checkpointing)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, SHAPES[shape]["vocab_size"], (SEQ,), generator=generator).tolist()
            for _ in range(micro_batch * (STEPS + 1))]
    examples = [Example(input_ids=r, labels=r, truncated=False) for r in rows]
    settings = TrainingSettings(max_steps=STEPS, batch_size=micro_batch, micro_batch_size=micro_batch,
                                max_seq_len=SEQ, eval_every=10_000, early_stopping_patience=0)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        outcome = train(model, examples[micro_batch:], examples[:1], settings, micro_batch * SEQ, "cuda",
                        Path(scratch) / "best", logging.getLogger("bench"), progress=False)
        wall = time.perf_counter() - started
    estimate = estimate_memory(ModelShape.from_config(SHAPES[shape]), method, "cuda", micro_batch, SEQ,
                               checkpointing, lora.r, "all-linear", lora.dropout)
    steady = [r["tokens_per_s"] for r in outcome.history[1:]]
    del model
    return {
        "shape": shape, "method": method, "micro_batch": micro_batch, "grad_ckpt": checkpointing,
        "measured_gib": round(outcome.peak_memory_bytes / GIB, 2),
        "estimated_gib": round(estimate.gib, 2),
        "estimated_without_overhead_gib": round((estimate.total - estimate.overhead) / GIB, 2),
        "ratio_estimate_to_measured": round(estimate.total / outcome.peak_memory_bytes, 2),
        "tokens_per_s_after_first_step": round(sum(steady) / len(steady)),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["llama-1b"], choices=sorted(SHAPES))
    parser.add_argument("--out", default=None)
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for shape in args.shapes:
        path = checkpoint_for(shape, Path(args.scratch))
        for method, micro_batch, checkpointing in CASES[shape]:
            try:
                result = run_case(shape, path, method, micro_batch, checkpointing)
            except torch.cuda.OutOfMemoryError:
                result = {"shape": shape, "method": method, "micro_batch": micro_batch,
                          "grad_ckpt": checkpointing, "error": "OOM"}
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
