"""Merging an adapter into a full-precision base: sharded safetensors, generation config, tokenizer,
and the logit check that fails the publish when the merged model does not compute base + adapter."""
import json

import pytest
import torch

from conftest import demo_texts
from tasks.engine.export import ExportError, export_model


def adapter(tiny_model, dest, broken=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if broken:  # what a diverged training run leaves behind
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    model.save_pretrained(dest)
    return str(dest)


def test_merged_model_is_sharded_complete_and_equal_to_base_plus_adapter(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    verification = export_model(str(tiny_model), adapter(tiny_model, tmp_path / "adapter"), True, out,
                                torch.float32, tiny_tokenizer, demo_texts()[:4], "cpu", max_shard_size="100KB")
    assert verification["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert verification["merge_max_abs_logit_diff"] < 1e-3 and verification["saved_max_abs_logit_diff"] < 1e-3
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tiny_tokenizer.eos_token_id
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers reads the shards through the index


def test_a_merge_that_does_not_reproduce_base_plus_adapter_fails(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ExportError, match="merged model differs from base \\+ adapter"):
        export_model(str(tiny_model), adapter(tiny_model, tmp_path / "adapter", broken=True), True,
                     tmp_path / "merged", torch.float32, tiny_tokenizer, demo_texts()[:4], "cpu")
    assert not (tmp_path / "merged").exists()  # nothing saved to publish



def test_weights_that_do_not_fit_the_gpu_in_the_publish_dtype_are_scored_on_the_cpu():
    # The gate scores what is published (tasks/evaluate.py): a QLoRA plan for 8B on a 24 GiB GPU cannot hold
    # the fp32 merge there (45 GiB with headroom), so it is scored on the CPU; its bf16 copy (22 GiB) fits.
    from types import SimpleNamespace

    from tasks.evaluate import scoring_device

    def planned(device, budget_gib):
        return SimpleNamespace(model_parameters=8 * 10**9,
                               plan=SimpleNamespace(device=device, budget_bytes=budget_gib * 2**30))

    assert scoring_device(planned("cuda", 24), torch.float32) == "cpu"
    assert scoring_device(planned("cuda", 24), torch.bfloat16) == "cuda"
    assert scoring_device(planned("cuda", 80), torch.float32) == "cuda"
    assert scoring_device(planned("cpu", 1), torch.float32) == "cpu"
