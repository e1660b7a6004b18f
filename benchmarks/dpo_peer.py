"""TRL's DPOTrainer on the pairs benchmarks/preference_speed.py trains: the peer for issue 21's GPU figures.

    python benchmarks/dpo_peer.py --shape llama-8b --method lora --pairs-per-step 8 --steps 8

The same random-weight checkpoint (gpu_memory.checkpoint_for), the same random pairs (preference_speed.random_pairs,
same seed), the same adapter (r=16, alpha 32, dropout 0.05 on the 7 projections), DPO sigmoid with beta 0.1, a
constant learning rate, no gradient checkpointing. TRL tokenizes text, so each token id is written as a word
`t<id>` for a word-level tokenizer that maps it back (one EOS is added to each answer, as TRL does). TRL 1.x pads
each batch to its longest side (its padding-free mode is disabled in this release). Tokens/s counts the tokens
both sides hold without padding (the prompt twice, as our packed pairs hold it); peak is max_memory_allocated.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def word_tokenizer(vocab_size: int, folder: Path):
    """Token id i is the word `t<i>`; words split on spaces."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t1", eos_token="t2",
                                   bos_token="t3", model_max_length=4096)
    fast.save_pretrained(folder)
    return fast


def as_text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"])
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--micro-pairs", type=int, help="pairs per forward (default: all of a step's); the rest is "
                        "gradient accumulation")
    parser.add_argument("--steps", type=int, default=8, help="the first 3 are warm-up, not timed")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from gpu_memory import SHAPES, checkpoint_for
    from peft import LoraConfig
    from preference_speed import random_pairs
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    warm = 3
    vocab = SHAPES[args.shape]["vocab_size"]
    pairs = random_pairs(args.pairs_per_step * args.steps + 2, vocab)[2:]  # the pairs preference_speed trains
    rows = []
    for pair in pairs:
        prompt_length = sum(1 for label in pair.chosen.labels if label < 0)
        rows.append({"prompt": as_text(pair.chosen.input_ids[:prompt_length]),
                     "chosen": " " + as_text(pair.chosen.input_ids[prompt_length:]) + " ",
                     "rejected": " " + as_text(pair.rejected.input_ids[prompt_length:]) + " "})

    path = checkpoint_for(args.shape, Path(tempfile.gettempdir()))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16) if args.method == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda" if torch.cuda.is_available() else None,
                                                 quantization_config=quantization, attn_implementation="sdpa")
    scratch = Path(tempfile.mkdtemp())
    tokenizer = word_tokenizer(vocab, scratch / "tokenizer")

    batches: list[int] = []  # tokens without padding, per batch the collator made

    class Timer(TrainerCallback):
        started = ended = None
        timed_tokens = 0

        def on_step_end(self, args_, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == warm:
                self.started = time.perf_counter()
            elif state.global_step > warm:
                self.timed_tokens += sum(batches[(state.global_step - 1) * accumulation:
                                                 state.global_step * accumulation])
                self.ended = time.perf_counter()

    micro = args.micro_pairs or args.pairs_per_step
    accumulation = args.pairs_per_step // micro
    config = DPOConfig(output_dir=str(scratch / "out"), per_device_train_batch_size=micro,
                       gradient_accumulation_steps=accumulation, max_steps=args.steps, max_length=4096, beta=0.1,
                       loss_type=["sigmoid"], bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), learning_rate=1e-5, lr_scheduler_type="constant",
                       gradient_checkpointing=False, logging_steps=1000, save_strategy="no", report_to=[],
                       dataloader_num_workers=0, dataset_num_proc=1, seed=0)
    timer = Timer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS,
                                                task_type="CAUSAL_LM"), callbacks=[timer])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        batches.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    import trl

    print(json.dumps({"recipe": "trl-dpo", **vars(args), "trl": trl.__version__,
                      "tokens_per_s": round(timer.timed_tokens / (timer.ended - timer.started)),
                      **({"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
                         if torch.cuda.is_available() else {})}), flush=True)


if __name__ == "__main__":
    main()
