"""Packed vs padded on a GPU, per model family: the CUDA paths the CPU tests cannot reach.

    python benchmarks/gpu_family_packing.py [--out results.json]   # on a CUDA machine

For each family, a tiny random model is loaded through the trainer (tasks/engine/modeling.py) for
LoRA (bf16 base) and full fine-tuning (fp32 master weights, bf16 autocast); the packed loss and
gradients (varlen FlashAttention, or the path use_packed_attention chose for the family) are
compared with one right-padded batch through the model's own forward under the same autocast.
bf16 rounding differs between the two paths, so the check is a relative loss difference and the
cosine similarity of each gradient, not equality.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tasks.config import LoraSettings  # noqa: E402
from tasks.data.tokenization import IGNORE_INDEX, Example  # noqa: E402

SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512, "initializer_range": 0.05,
         "vocab_size": 1000, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
WINDOW = 16
FAMILIES = {
    "llama": {},
    "gemma2": {"sliding_window": WINDOW, "query_pre_attn_scalar": 64, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 3.0},
    "gemma3_text": {"sliding_window": WINDOW, "query_pre_attn_scalar": 64,
                    "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 3.0},
    "cohere2": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"], "logit_scale": 0.5},
    "mistral": {"sliding_window": WINDOW},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1,
                "logits_scaling": 4.0},
    "olmo2": {}, "smollm3": {"no_rope_layers": [1, 0]}, "glm4": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128},
}


def rows(seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(8):
        n = rng.randint(24, 120)
        ids = [rng.randint(3, SMALL["vocab_size"] - 1) for _ in range(n)]
        prompt = rng.randint(4, n // 2)
        out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:], truncated=False))
    return out


def padded_loss(model, examples: list[Example]) -> torch.Tensor:
    width = max(len(r.input_ids) for r in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, r in enumerate(examples):
        ids[i, :len(r.input_ids)], labels[i, :len(r.labels)], mask[i, :len(r.input_ids)] = (
            torch.tensor(r.input_ids), torch.tensor(r.labels), 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=False).logits.float()
    labels = labels.cuda()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def check(model_type: str, method: str, folder: str) -> dict:
    from tasks.engine.modeling import load_for_training
    from tasks.engine.train_loop import accumulate_gradients

    lora = LoraSettings(r=8, dropout=0.0)
    examples = rows()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = load_for_training(folder, method, "cuda", lora, False)
        if method == "lora":  # non-zero B: lora_A gets gradients too
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in sorted(model.named_parameters()):
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=generator).to(p) * 0.1)
        models.append(model)
    reference, packed = models
    tokens = sum(r.trainable_tokens for r in examples)
    expected = padded_loss(reference, examples)
    (expected / tokens).backward()
    loss_sum, _ = accumulate_gradients(packed, examples, 3 * 120, "cuda")
    cosines = []
    for (name, a), (_, b) in zip(reference.named_parameters(), packed.named_parameters()):
        if a.requires_grad and a.grad is not None:
            cosine = F.cosine_similarity(a.grad.float().flatten(), b.grad.float().flatten(), dim=0).item()
            cosines.append((cosine, name))
    worst = min(cosines)
    return {"family": model_type, "method": method,
            "attention": packed.config._attn_implementation if hasattr(packed, "config") else "?",
            "padded_loss": expected.item(), "packed_loss": loss_sum,
            "loss_rel_diff": abs(loss_sum - expected.item()) / expected.item(),
            "worst_grad_cosine": round(worst[0], 5), "worst_grad": worst[1], "grads": len(cosines)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for model_type in args.families.split(","):
            settings = {**SMALL, **FAMILIES[model_type]}
            folder = str(Path(scratch) / model_type)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).save_pretrained(folder)
            for method in ("lora", "full"):
                try:
                    result = check(model_type, method, folder)
                except Exception as error:  # noqa: BLE001  (one family's failure must not hide the others)
                    result = {"family": model_type, "method": method, "error": f"{type(error).__name__}: {error}"[:400]}
                print(json.dumps(result), flush=True)
                results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
