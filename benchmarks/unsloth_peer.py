"""The leading peer at its best, on the rows and memory caps benchmarks/training_speed.py gives ours.

Unsloth (2026.10.9, carried to the GPU machine as wheels) trains the same random-init Llama shape
through TRL's `SFTTrainer` with `packing=True`: TRL's best-fit-decreasing bins of 2048 tokens,
padding-free (rows in a bin see only themselves, through `position_ids`), Unsloth's own gradient
checkpointing ("unsloth": layer inputs offloaded to CPU), LoRA r=16 on the 7 projections with
dropout 0 (its fast path), fused AdamW. Steps of `bins_per_micro_batch` x `accumulation` bins, about
8k tokens, as ANCHORS.md measured it. The rows are the same chat-length token rows ours gets.

Useful tokens are counted as the collator hands batches over (padding-free: every token is a row's),
and the FIFO of counts is drained one optimizer step at a time, so prefetching cannot shift them.
One process per method: it loads the model once and trains at each cap in turn (the allocator's
cap is lowered or raised between them, its cache emptied), with the best configuration for that cap.

    python benchmarks/unsloth_peer.py --method lora --caps 24 48 80 --out results.jsonl
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 2048


def cap_memory(cap_gib: float | None) -> None:
    """Cap this process's CUDA allocator at `cap_gib`, as a smaller GPU would (the same call for every recipe)."""
    import torch

    if cap_gib:  # a later call replaces the cap
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer of `vocab_size` ids beside the random checkpoint: Unsloth and TRL load
    one with the model, though the rows come already tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if (path / "tokenizer.json").exists():
        return
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t1", eos_token="t2",
                            bos_token="t3", model_max_length=SEQ).save_pretrained(path)


def best_steps(cap_gib: float | None) -> tuple[int, int]:
    """(bins per micro-batch, accumulation) for about 8k tokens a step: one pass of 4 bins, its fastest
    (measured 2026-12-01: 6.5k tokens/s for 8B LoRA in 17.1 GiB, against 4.3-6.4k for 2 x 2 in 16.4 GiB),
    or 2 x 2, as ANCHORS.md measured it, under a cap too small for that."""
    return (4, 1) if cap_gib is None or cap_gib >= 20 else (2, 2)


def load(shape: str, method: str):
    import unsloth  # noqa: F401  (first: it patches transformers, peft and TRL as it loads)
    import torch
    from gpu_memory import SHAPES, checkpoint_for
    from unsloth import FastLanguageModel

    path = checkpoint_for(shape, Path(tempfile.gettempdir()))
    save_word_tokenizer(path, SHAPES[shape]["vocab_size"])
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=SEQ, dtype=torch.bfloat16,
                                                         load_in_4bit=method == "qlora", local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=PROJECTIONS,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0)
    return model, tokenizer


def run(model, tokenizer, shape: str, data: str, cap_gib: float | None, warm_steps: int, timed_steps: int) -> dict:
    import unsloth
    import torch
    from datasets import Dataset
    from gpu_memory import SHAPES
    from seed_recipe import Rand
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.cuda.empty_cache()
    cap_memory(cap_gib)
    bins_per_micro_batch, accumulation = best_steps(cap_gib)
    steps = warm_steps + timed_steps
    rows = Rand(bins_per_micro_batch * accumulation * 8 * (steps + 2), SEQ, SHAPES[shape]["vocab_size"], data)
    dataset = Dataset.from_dict({"input_ids": [rows[i]["input_ids"].tolist() for i in range(len(rows))]})
    counts: collections.deque[int] = collections.deque()

    class Timer(TrainerCallback):
        def __init__(self):
            self.started = self.useful = None

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            step_tokens = sum(counts.popleft() for _ in range(accumulation))
            if state.global_step == warm_steps:
                self.started, self.useful = time.perf_counter(), 0
            elif state.global_step > warm_steps:
                self.useful += step_tokens
                self.ended = time.perf_counter()

    config = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bins_per_micro_batch,
                       gradient_accumulation_steps=accumulation, max_steps=steps, packing=True, max_length=SEQ,
                       bf16=True, learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch_fused",
                       logging_steps=1000, save_strategy="no", report_to=[], dataloader_num_workers=0,
                       dataset_num_proc=1, seed=0)
    timer = Timer()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=config,
                         callbacks=[timer])
    collate = trainer.data_collator

    def counting(batch):
        out = collate(batch)
        mask = out.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(out["input_ids"].numel()))
        return out

    trainer.data_collator = counting
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    del trainer  # its optimizer states, before the next cap
    seconds = timer.ended - timer.started
    return {"useful_tokens_per_s": round(timer.useful / seconds), "step_s": round(seconds / timed_steps, 4),
            "tokens_per_step": round(timer.useful / timed_steps),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "grad_ckpt": "unsloth", "bins_per_micro_batch": bins_per_micro_batch, "accumulation": accumulation,
            "packing": "trl bfd, padding-free", "unsloth": unsloth.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--method", choices=["lora", "qlora"], required=True)
    parser.add_argument("--data", choices=["chat", "fixed"], default="chat")
    parser.add_argument("--caps", type=float, nargs="+", default=[24, 48, 80])
    parser.add_argument("--warm-steps", type=int, default=4)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = load(args.shape, args.method)
    for cap in args.caps:
        started = time.time()
        try:
            result = run(model, tokenizer, args.shape, args.data, cap, args.warm_steps, args.timed_steps)
        except Exception as error:  # an OOM or a failure is a result too
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        result = {"recipe": "unsloth", "shape": args.shape, "method": args.method, "data": args.data,
                  "cap_gib": cap, **result, "wall_s": round(time.time() - started, 1)}
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
