# The seed recipe, verbatim from ../shared/bench/anchor_hf.py (team reference harness, 2026-11-28):
# HF Trainer + peft + bitsandbytes, padding per batch. benchmarks/training_speed.py runs it beside
# this project's engine on the same GPU, shapes and data. Kept as-is so its figures stay comparable
# with ANCHORS.md; do not tune it.
"""Anchor benchmark: the seed's recipe (HF Trainer + PEFT + bitsandbytes) on a random-init Llama.

Measures tokens/s and peak GPU memory for full / LoRA / QLoRA so the project's trainer
can be compared side by side on the same shapes. Random weights: throughput and memory
do not depend on weight values.
"""
import argparse, json, os, tempfile, time, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, TrainerCallback

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}

class Timer(TrainerCallback):
    def __init__(self, warm):
        self.warm, self.t0, self.t1, self.n = warm, None, None, 0
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        if state.global_step == self.warm:
            self.t0 = time.perf_counter(); self.n = 0; self.u0 = USEFUL[0]
        elif state.global_step > self.warm:
            self.n += 1; self.t1 = time.perf_counter()

class Rand(torch.utils.data.Dataset):
    """Fixed-length rows, or 'chat' rows whose lengths follow an instruction-data-like
    log-normal (median ~220 tokens, long tail, capped at seq) padded per batch."""
    def __init__(self, n, seq, vocab, lengths="fixed"):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)
        if lengths == "fixed":
            self.len = [seq] * n
        else:
            import random, math
            r = random.Random(0)
            self.len = [max(16, min(seq, int(math.exp(r.gauss(math.log(220), 0.8))))) for _ in range(n)]
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        x = self.x[i][: self.len[i]]
        return {"input_ids": x, "labels": x}

USEFUL = [0]
def collate(rows):
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long); lab = torch.full((len(rows), L), -100); att = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"]); ids[i, :n] = r["input_ids"]; lab[i, :n] = r["labels"]; att[i, :n] = 1
        USEFUL[0] += n
    return {"input_ids": ids, "labels": lab, "attention_mask": att}

def run(shape, method, seq, bs, steps, gc, r, targets, literal, liger=False, lengths="fixed"):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 4096))
    cfg._attn_implementation = "sdpa"
    dtype = torch.float32 if literal else torch.bfloat16
    if method == "qlora":
        import bitsandbytes  # noqa
        from transformers import BitsAndBytesConfig
        from peft import prepare_model_for_kbit_training
        # build bf16 on cpu, save, reload quantized (the only path bnb supports)
        path = os.path.join(tempfile.gettempdir(), f"anchor-{shape}")
        if not os.path.exists(path):
            with torch.device("cuda"):
                m = LlamaForCausalLM(cfg).to(torch.bfloat16)
            m.save_pretrained(path); del m; torch.cuda.empty_cache()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    else:
        torch.set_default_dtype(dtype)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    warm = 5
    args = TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "anchor-out"), per_device_train_batch_size=bs, max_steps=warm + steps,
                             bf16=not literal, fp16=literal, gradient_checkpointing=gc, logging_steps=1000,
                             save_strategy="no", report_to=[], dataloader_num_workers=0, learning_rate=1e-4,
                             optim="adamw_torch_fused" if not literal else "adamw_torch", use_liger_kernel=liger,
                             dataloader_drop_last=True, remove_unused_columns=False)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    setup_gib = round(torch.cuda.memory_allocated() / 2**30, 2)
    t = Timer(warm)
    tr = Trainer(model=model, args=args, train_dataset=Rand(bs * (warm + steps) + 8, seq, cfg.vocab_size, lengths), data_collator=collate, callbacks=[t])
    try:
        tr.train()
        dt = t.t1 - t.t0
        useful = USEFUL[0] - t.u0  # rows collated after warm-up (prefetch makes this approximate)
        res = dict(tokens_per_s=round(t.n * bs * seq / dt) if lengths == "fixed" else None,
                   useful_tokens_per_s=round(useful / dt), step_s=round(dt / t.n, 4),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), setup_gib=setup_gib)
    except torch.cuda.OutOfMemoryError as e:
        res = dict(error="OOM")
    except Exception as e:
        res = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    del tr, model; torch.cuda.empty_cache()
    return dict(shape=shape, method=method, seq=seq, bs=bs, gc=gc, r=r, liger=liger, lengths=lengths, targets=targets if method != "full" else "all",
                literal_seed=literal, trainable=ntrain, **res)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="json list of dicts")
    ap.add_argument("--out", default="anchor.jsonl")
    a = ap.parse_args()
    for c in json.loads(a.cases):
        kw = dict(seq=2048, bs=4, steps=15, gc=False, r=16, targets="all-linear", literal=False); kw.update(c)
        t0 = time.time()
        res = run(**kw); res["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(res), flush=True)
        with open(a.out, "a") as f: f.write(json.dumps(res) + "\n")
