"""Turn the best checkpoint into a standalone model folder, and prove it computes the same thing.

An adapter is merged into a full-precision (fp32) reload of the base, never into 4-bit weights
(peft would merge into re-quantised weights, which is lossy). Two checks on a probe batch:
1. merge: merged fp32 logits equal base + adapter logits (a broken merge fails the publish);
2. saved: the folder written to disk reloads and gives the same logits (fp32), or, in a 16-bit
   publish dtype whose rounding moves logits a little, mostly the same next token.
It runs on `device`; the caller picks the CPU when an fp32 copy of the model would not fit the GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tasks.engine.modeling import load_for_inference
from tasks.store.weight_safety import SAFE, ModelLoadingSettings, pretrained_kwargs

MERGE_TOLERANCE = 1e-3  # max |logit difference| between merged and unmerged fp32 models
MIN_SAVED_AGREEMENT = 0.9  # share of probe positions whose top-1 token survives a cast to 16 bits
PROBE_TOKENS = 128  # per probe row: enough to check, small enough that fp32 logits stay cheap


class ExportError(RuntimeError):
    """The exported model does not reproduce the trained one."""


def publish_dtype(base_path: str, requested: str) -> torch.dtype:
    if requested != "base":
        return getattr(torch, requested)
    config = json.loads((Path(base_path) / "config.json").read_text())
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")


@torch.no_grad()
def export_model(base_path: str, checkpoint_dir: str, is_adapter: bool, out_dir: Path, dtype: torch.dtype,
                 tokenizer, probe_texts: list[str], device: str, max_shard_size: str = "2GB",
                 loading: ModelLoadingSettings = SAFE) -> dict:
    tokenizer.padding_side = "right"
    probe = tokenizer(probe_texts, add_special_tokens=False, padding=True, truncation=True,
                      max_length=PROBE_TOKENS, return_tensors="pt").to(device)
    mask = probe["attention_mask"].bool()
    if is_adapter:
        model = load_for_inference(base_path, device, adapter=checkpoint_dir, dtype=torch.float32, loading=loading)
        expected = model(**probe).logits[mask]
        model = model.merge_and_unload()
        merge_error = (model(**probe).logits[mask] - expected).abs().max().item()
        if not merge_error <= MERGE_TOLERANCE:  # written so that NaN fails too
            raise ExportError(f"merged model differs from base + adapter by {merge_error:.2e} (> {MERGE_TOLERANCE})")
    else:
        model = load_for_inference(checkpoint_dir, device, dtype=torch.float32, loading=loading)
        expected, merge_error = model(**probe).logits[mask], 0.0
    model.config.use_cache = True  # training turned the KV cache off; users generate with it
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    _save_generation_config(model, tokenizer, out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    # The folder was just written by save_pretrained (safetensors): no pickle, no remote code.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, device_map={"": device},
                                                    **pretrained_kwargs(SAFE)).eval()
    saved = reloaded(**probe).logits[mask]
    agreement = (saved.argmax(-1) == expected.argmax(-1)).float().mean().item()
    verification = {
        "probe_rows": len(probe_texts),
        "probe_tokens": int(mask.sum()),
        "merge_max_abs_logit_diff": merge_error,
        "saved_dtype": str(dtype).removeprefix("torch."),
        "saved_max_abs_logit_diff": (saved - expected).abs().max().item(),
        "saved_top1_agreement": agreement,
    }
    verification["shards"] = len(list(out_dir.glob("*.safetensors")))
    lossless = dtype == torch.float32
    if (lossless and not verification["saved_max_abs_logit_diff"] <= MERGE_TOLERANCE) or \
            not agreement >= MIN_SAVED_AGREEMENT:  # NaN fails
        raise ExportError(f"the saved model does not reproduce the trained one: {verification}")
    return verification


def _save_generation_config(model, tokenizer, out_dir: Path) -> None:
    """Users generate with the published folder: give it the base's generation settings, or defaults
    built from the model config, with end-of-sequence and padding tokens the tokenizer really has."""
    from transformers import GenerationConfig

    if (out_dir / "generation_config.json").exists():
        return  # save_pretrained wrote the one the base model came with
    generation = GenerationConfig.from_model_config(model.config)
    generation.eos_token_id = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    generation.pad_token_id = generation.pad_token_id if generation.pad_token_id is not None else tokenizer.pad_token_id
    generation.save_pretrained(out_dir)


def forward_published(folder: Path, base_path: str) -> tuple[Path, int, bool]:
    """Load a downloaded run folder as a user would (plain transformers) and run one forward pass:
    (the model folder, its parameter count, whether the logits are finite). The folder is untrusted:
    no code from it runs and no pickle is opened (tasks/store/weight_safety.py)."""
    from transformers import AutoTokenizer

    from tasks.store.weight_safety import require_safe_weights, tokenizer_kwargs

    if (folder / "merged").is_dir():
        model_dir = folder / "merged"
        require_safe_weights(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **pretrained_kwargs())
    else:  # adapter-only publish: the consumer brings the base (transformers applies it through peft)
        model_dir = folder / "adapter"
        require_safe_weights(base_path)
        require_safe_weights(model_dir)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **pretrained_kwargs())
        model.load_adapter(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **tokenizer_kwargs())
    inputs = tokenizer(["Hello"], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    return model_dir, model.num_parameters(), bool(torch.isfinite(logits).all())
