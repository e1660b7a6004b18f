"""Where a 1B full fine-tuning step's time goes: forward+backward, gradient clipping, AdamW, zero_grad.

Trains the random-init llama-1b shape (benchmarks/seed_recipe.py) through the train loop's own parts
(tasks/engine/train_loop.accumulate_gradients and adamw_for) on 4 full-length rows a step (the seed's
batch), with torch.cuda.synchronize between the parts, and prints milliseconds a step averaged over
7 steps after 3 of warm-up. Run on a CUDA machine, once per precision:

    python benchmarks/full_step_breakdown.py fp32     # fp32 master weights, torch's fused AdamW
    python benchmarks/full_step_breakdown.py bf16     # bf16 weights, tasks/engine/bf16_adamw.py
"""
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main(precision: str) -> None:
    import torch
    from training_speed import SEQ, random_examples, random_model

    from tasks.config import TrainingSettings
    from tasks.engine.distributed import ONE_PROCESS
    from tasks.engine.train_loop import accumulate_gradients, adamw_for

    rows, warm, timed = 4, 3, 7
    model = random_model("llama-1b", "full", False, full_precision=precision).train()
    examples = random_examples(rows * (warm + timed), model.config.vocab_size, "fixed")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw_for(parameters, TrainingSettings(learning_rate=1e-4), "cuda")
    parts = {"forward_backward": [], "clip": [], "optimizer": [], "zero_grad": []}
    for step in range(warm + timed):
        marks = [time.perf_counter()]
        for work in (lambda: accumulate_gradients(model, examples[rows * step:rows * (step + 1)], rows * SEQ, "cuda",
                                                  ONE_PROCESS),
                     lambda: torch.nn.utils.clip_grad_norm_(parameters, 1.0), optimizer.step,
                     lambda: optimizer.zero_grad(set_to_none=True)):
            work()
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
        if step >= warm:
            for (name, seconds), start, end in zip(parts.items(), marks, marks[1:]):
                seconds.append(end - start)
    print(json.dumps({"precision": precision, **{k: round(1000 * sum(v) / len(v), 1) for k, v in parts.items()},
                      "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
