"""How far the memory estimate (tasks/planning/memory.py) is from the peak of this project's trainer on a GPU.

    python benchmarks/gpu_memory.py measure --out results.jsonl   # on a CUDA machine
    python benchmarks/gpu_memory.py table results.jsonl           # anywhere: estimate vs measured
    python benchmarks/gpu_memory.py probe --out probe.jsonl       # on a CUDA machine: the probe's estimate too

`measure` trains each point for a few optimizer steps through the same code the train task runs
(tasks/modeling.load_for_training, tasks/trainer.train), on random-weight models built from
configs (0.5B Qwen2, 1.5B and 8B Llama), full-length rows whose every token is trained (the
estimator's worst case: packed micro-batches filled to capacity). It records what the process held
on the GPU at its peak (allocator reservation + CUDA context; an out-of-memory error is about this
number), the allocator's peak allocation, and the static memory after training (weights and
optimizer state). `table` recomputes the estimate of every point from its config with the estimator
as it is now and prints the error; measurements stay valid as long as the trainer does not change.

`probe` does what `measure` does and, before each point, runs the memory probe a plan uses for a family
without a formula (tasks/engine/memory_probe.py: the method's model, forward and backward at the
rows' length and twice it, with no layer and with every layer checkpointed, and larger checkpointed
steps (measured.CHECKPOINTED_PROBE_TOKENS); once per shape and method). What the probe leaves allocated is
recorded (before_probe_bytes, after_probe_bytes) and stops the run when it would inflate the point.
The probe's result is stored with the point, and `table` adds its estimate (tasks/planning/measured.py)
beside the formula's: the check that a measured plan lands within 10% of the trainer's peak.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.planning.memory import GIB, ModelShape, estimate_memory  # noqa: E402

SHAPES = {  # public configs' shapes; random weights
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # Other architectures, to check the estimate away from the shapes it was checked on first.
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "gemma-2b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                     num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000,
                     tie_word_embeddings=True),
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False),
    # The families issue 16 added (published configs; the two mixtures of experts with fewer layers, so
    # that full-size expert blocks fit beside the other points).
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                      sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      query_pre_attn_scalar=256, tie_word_embeddings=True),
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                      sliding_window=512, tie_word_embeddings=True),
    "olmo2-1b": dict(model_type="olmo2", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=100352, tie_word_embeddings=False),
    "granite-2b": dict(model_type="granite", hidden_size=2048, intermediate_size=8192, num_hidden_layers=40,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=49155, tie_word_embeddings=True,
                       embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                       attention_multiplier=0.015625),
    "smollm3-3b": dict(model_type="smollm3", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=4, vocab_size=128256, tie_word_embeddings=True),
    "command-r7b": dict(model_type="cohere2", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=256000,
                        sliding_window=4096, logit_scale=0.25, tie_word_embeddings=True),
    "glm4-9b": dict(model_type="glm4", hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=2, head_dim=128, vocab_size=151552,
                    attention_bias=True, tie_word_embeddings=False),
    "mixtral-8x7b-4l": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                            num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3-30b-a3b-6l": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                             moe_intermediate_size=768, num_hidden_layers=6, num_attention_heads=32,
                             num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                             num_experts_per_tok=8, tie_word_embeddings=False),
}
SEQ = 2048
POINTS = {  # set -> (shape, method, gradient checkpointing, rows of SEQ tokens per micro-batch)
    "main": [
        *[(s, m, c, 4) for s in ("qwen2.5-0.5b", "llama-1b") for m in ("full", "lora", "qlora") for c in (False, True)],
        ("qwen2.5-0.5b", "lora", False, 8), ("qwen2.5-0.5b", "full", True, 8), ("llama-1b", "full", False, 2),
        ("llama-1b", "qlora", True, 8),
        *[("llama-8b", m, c, 2) for m in ("lora", "qlora") for c in (False, True)],
        ("llama-8b", "lora", True, 8), ("llama-8b", "qlora", False, 4), ("llama-8b", "full", True, 1),
    ],
    "other-architectures": [
        ("qwen3-1.7b", "full", False, 2), ("qwen3-1.7b", "lora", True, 4), ("gemma-2b", "lora", False, 4),
        ("gemma-2b", "full", True, 2), ("phi3-mini", "qlora", False, 2), ("phi3-mini", "lora", True, 4),
        ("mistral-7b", "lora", False, 2), ("mistral-7b", "qlora", True, 4),
    ],
    # Measured after the estimator's constants were set from the sets above: a check out of sample.
    "validation": [
        ("qwen3-1.7b", "qlora", False, 4), ("gemma-2b", "qlora", True, 8), ("phi3-mini", "full", True, 1),
        ("mistral-7b", "lora", True, 8), ("llama-8b", "lora", False, 1), ("qwen2.5-0.5b", "full", False, 16),
        ("llama-1b", "lora", False, 16), ("llama-8b", "qlora", True, 16),
    ],
    # full_precision bf16 (tasks/engine/bf16_adamw.py), first measured on 2026-12-01 (issue 17).
    "full-bf16": [
        *[("llama-1b", "full-bf16", c, r) for c in (False, True) for r in (1, 4)], ("qwen2.5-0.5b", "full-bf16", False, 4),
        ("qwen3-1.7b", "full-bf16", True, 4), ("llama-8b", "full-bf16", True, 2),
    ],
    # Issue 16's families, first measured on 2026-12-01.
    "new-families": [
        ("gemma2-2b", "lora", False, 4), ("gemma2-2b", "full", True, 2), ("gemma3-1b", "full", False, 2),
        ("gemma3-1b", "qlora", True, 4), ("olmo2-1b", "full", False, 2), ("olmo2-1b", "lora", True, 4),
        ("granite-2b", "lora", False, 4), ("granite-2b", "qlora", True, 4), ("smollm3-3b", "lora", True, 4),
        ("smollm3-3b", "full", True, 2), ("command-r7b", "qlora", False, 2), ("glm4-9b", "lora", True, 4),
        ("mixtral-8x7b-4l", "lora", False, 2), ("mixtral-8x7b-4l", "qlora", True, 2),
        ("qwen3-30b-a3b-6l", "lora", True, 2), ("qwen3-30b-a3b-6l", "qlora", False, 2),
    ],
    # The probe's check (`probe`): every method, with and without checkpointing, micro-batches from the
    # probe's own sizes (2 and 4 rows) up to 8 times them.
    "probe": [
        ("qwen2.5-0.5b", "lora", False, 8), ("qwen2.5-0.5b", "full", True, 4), ("llama-1b", "full", False, 2),
        ("llama-1b", "qlora", True, 16), ("qwen3-1.7b", "lora", True, 4), ("gemma-2b", "lora", False, 4),
        ("phi3-mini", "qlora", False, 2), ("mistral-7b", "lora", True, 8), ("llama-8b", "qlora", False, 4),
    ],
    # Run where liger-kernel is not installed: the unfused RMSNorm, RoPE and SwiGLU of transformers.
    "unfused": [("qwen2.5-0.5b", "lora", False, 4), ("llama-1b", "full", False, 4), ("llama-1b", "qlora", False, 4),
                ("llama-8b", "lora", True, 2)],
}
STEPS = 3
LORA = dict(r=16, alpha=32, dropout=0.05)


def checkpoint_for(shape: str, root: Path) -> Path:
    """A random bf16 checkpoint of `shape`, written once per machine: the train task loads from disk,
    and 4-bit loading needs weights on disk (bitsandbytes quantizes while loading)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = root / f"anchor-{shape}"
    if not (path / "config.json").exists():
        fields = dict(SHAPES[shape])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields, max_position_embeddings=4096)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def measure_point(shape: str, path: Path, method: str, checkpointing: bool, rows: int) -> dict:
    import torch

    from tasks.config import LoraSettings, TrainingSettings
    from tasks.data.tokenization import Example
    from tasks.engine.kernels import fused_kernels_available
    from tasks.engine.modeling import load_for_training
    from tasks.engine.train_loop import train

    torch.cuda.empty_cache()
    method, precision = split_method(method)
    model = load_for_training(str(path), method, "cuda", LoraSettings(**LORA), checkpointing, full_precision=precision)
    loaded = torch.cuda.memory_allocated()
    generator = torch.Generator().manual_seed(0)
    token_rows = [torch.randint(0, SHAPES[shape]["vocab_size"], (SEQ,), generator=generator).tolist()
                  for _ in range(rows * STEPS + 1)]
    examples = [Example(input_ids=r, labels=r, truncated=False) for r in token_rows]
    settings = TrainingSettings(max_steps=STEPS, batch_size=rows, micro_batch_size=rows, max_seq_len=SEQ,
                                eval_every=10_000, early_stopping_patience=0)
    with tempfile.TemporaryDirectory() as scratch:
        outcome = train(model, examples[1:], examples[:1], settings, rows * SEQ, "cuda", Path(scratch) / "best",
                        logging.getLogger("bench"), progress=False)
    static = torch.cuda.memory_allocated()
    fused = fused_kernels_available(SHAPES[shape]["model_type"], "cuda")
    del model
    gc.collect()  # adapters and hooks make reference cycles: free the model before the next point
    return {"measured_bytes": outcome.peak_memory_bytes, "allocated_peak_bytes": outcome.peak_allocated_bytes,
            "after_load_bytes": loaded, "after_training_bytes": static, "fused_kernels": fused,
            "tokens_per_s": round(statistics.mean(r["tokens_per_s"] for r in outcome.history[1:]))}


def measure(args) -> None:
    """Train every point of the set; with `probe` (the `probe` command), run the memory probe of each
    shape and method first (once) and store its result with the point."""
    import torch

    from tasks.engine.modeling import use_expandable_segments

    use_expandable_segments("cuda")
    environment = {"gpu": torch.cuda.get_device_name(), "gpu_bytes": torch.cuda.mem_get_info()[1],
                   "torch": torch.__version__}
    print(json.dumps(environment), flush=True)
    points = [p for p in POINTS[args.set] if not args.shapes or p[0] in args.shapes]
    probes = {}
    for index, (shape, method, checkpointing, rows) in enumerate(points):
        path = checkpoint_for(shape, Path(args.scratch))
        point = {"shape": shape, "config": SHAPES[shape], "method": method, "grad_ckpt": checkpointing,
                 "tokens": rows * SEQ, "lora": LORA, **environment}
        if args.probe:
            if (shape, method) not in probes:
                probes[shape, method] = _probe(path, method, point)
            point["probe"] = probes[shape, method]
        started = time.time()
        try:
            point |= measure_point(shape, path, method, checkpointing, rows)
        except torch.cuda.OutOfMemoryError as error:
            point["error"] = f"OutOfMemoryError: {str(error).splitlines()[0][:200]}"
        point["wall_s"] = round(time.time() - started, 1)
        print(json.dumps(point), flush=True)
        with open(args.out, "a") as out:
            out.write(json.dumps(point) + "\n")
        torch.cuda.empty_cache()
        if all(later[0] != shape for later in points[index + 1:]):  # 8-9B checkpoints: keep the disk free
            shutil.rmtree(path, ignore_errors=True)


PROBE_LEFTOVER_BYTES = 256 * 2**20  # cuBLAS workspaces and the like, made once per process: not a leak


def _probe(path: Path, method: str, point: dict) -> dict | None:
    """The memory probe a plan runs for a family without a formula (tasks/engine/memory_probe.py). What
    is allocated right after it (as the plan's training would find it: no collection of ours first) goes
    into the point; a probe that leaves more than PROBE_LEFTOVER_BYTES stops the run (it would inflate
    the point's measurement)."""
    import torch

    from tasks.config import LoraSettings
    from tasks.engine.memory_probe import probe_memory

    gc.collect()
    torch.cuda.empty_cache()
    point["before_probe_bytes"] = torch.cuda.memory_allocated()
    result = probe_memory(str(path), method, LoraSettings(**LORA), longest_row=SEQ)
    point["after_probe_bytes"] = torch.cuda.memory_allocated()
    left = point["after_probe_bytes"] - point["before_probe_bytes"]
    if left > PROBE_LEFTOVER_BYTES:
        raise RuntimeError(f"the probe of {path.name} {method} left {left / 2**30:.2f} GiB allocated")
    return result.model_dump(mode="json") if result else None


def probe_estimate_for(point: dict):
    """The plan's estimate of a point from the probe stored with it (None when there is none)."""
    from tasks.planning.measured import MethodProbe, measured_estimate

    if not point.get("probe"):
        return None
    result = MethodProbe(**point["probe"])
    return measured_estimate(result, point["tokens"], result.layers if point["grad_ckpt"] else 0)


def split_method(method: str) -> tuple[str, str]:
    """A point's method, "full-bf16" being full fine-tuning with full_precision bf16: (method, full_precision)."""
    return ("full", "bf16") if method == "full-bf16" else (method, "fp32")


def estimate_for(point: dict):
    method, precision = split_method(point["method"])
    return estimate_memory(ModelShape.from_config(point["config"]), method, "cuda", point["tokens"],
                           point["grad_ckpt"], point["lora"]["r"], "all-linear", point["fused_kernels"],
                           full_precision=precision)


def table(args) -> None:
    points = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    points = [p for p in points if "shape" in p]
    print("| shape | method | grad ckpt | kernels | tokens | measured GiB | estimated GiB | error | allocated GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = []
    for p in points:
        estimate = estimate_for(p)
        if "error" in p:
            fits = "no" if estimate.total > p["gpu_bytes"] else "yes"
            print(f"| {p['shape']} | {p['method']} | {'yes' if p['grad_ckpt'] else 'no'} | {_kernels(p)} | {p['tokens']:,} | "
                  f"out of memory ({p['gpu_bytes'] / GIB:.0f} GiB GPU) | {estimate.gib:.2f} (fits: {fits}) | | |")
            continue
        error = estimate.total / p["measured_bytes"] - 1
        errors.append(error)
        print(f"| {p['shape']} | {p['method']} | {'yes' if p['grad_ckpt'] else 'no'} | {_kernels(p)} | {p['tokens']:,} | "
              f"{p['measured_bytes'] / GIB:.2f} | {estimate.gib:.2f} | {error:+.1%} | "
              f"{p['allocated_peak_bytes'] / GIB:.2f} |")
    _summary(errors)
    if any(p.get("probe") for p in points):
        _probe_table([p for p in points if "error" not in p and p.get("probe")])


def _probe_table(points: list[dict]) -> None:
    """The probe's estimate of each point beside the formula's, against the trainer's peak."""
    print("\n| shape | method | grad ckpt | tokens | measured GiB | probe GiB | probe error | formula error | probe s |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = []
    for p in points:
        probed, formula = probe_estimate_for(p), estimate_for(p)
        error = probed.total / p["measured_bytes"] - 1
        errors.append(error)
        print(f"| {p['shape']} | {p['method']} | {'yes' if p['grad_ckpt'] else 'no'} | {p['tokens']:,} | "
              f"{p['measured_bytes'] / GIB:.2f} | {probed.gib:.2f} | {error:+.1%} | "
              f"{formula.total / p['measured_bytes'] - 1:+.1%} | {p['probe']['seconds']:.0f} |")
    _summary(errors, "probe-based estimates")


def _summary(errors: list[float], what: str = "points measured") -> None:
    if errors:
        worst = max(errors, key=abs)
        print(f"\n{len(errors)} {what}: median |error| {statistics.median(map(abs, errors)):.1%}, "
              f"worst {worst:+.1%}, most under-estimated {min(errors):+.1%}; "
              f"within +-10%: {sum(abs(e) <= 0.10 for e in errors)}/{len(errors)}")


def _kernels(point: dict) -> str:
    return "Liger" if point.get("fused_kernels") else "unfused"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True)
    for name, default_set, probe, what in (
            ("measure", "main", False, "train every point on this machine's GPU"),
            ("probe", "probe", True, "measure, with the memory probe's estimate of every point")):
        run = commands.add_parser(name, help=what)
        run.add_argument("--out", required=True)
        run.add_argument("--set", default=default_set, choices=sorted(POINTS))
        run.add_argument("--shapes", nargs="*", choices=sorted(SHAPES))
        run.add_argument("--scratch", default=tempfile.gettempdir())
        run.set_defaults(handler=measure, probe=probe)
    show = commands.add_parser("table", help="estimate vs measured, with the estimator as it is now")
    show.add_argument("results")
    show.set_defaults(handler=table)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
