"""Every model family the project supports, on a tiny random model of that family (issue 16).

For each family: the plan works from its config.json (and its estimate follows what the trainer
keeps, for families with a formula); packed training computes what padded training computes (loss
and gradients, full fine-tuning and LoRA with a non-zero B, so lora_A's gradients are compared too);
and LoRA training through the trainer lowers the loss. CPU only, real models, no downloads.
"""
import importlib.util
import json
import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_DATA, ROOT
from test_memory import bytes_kept_for_backward
from test_packing import padded_loss
from tasks.config import LoraSettings, TrainingSettings
from tasks.data.tokenization import Example, encode_all, load_tokenizer
from tasks.data.validation import read_dataset
from tasks.planning.memory import FAMILIES, MOE_MODEL_TYPES, ModelShape, kept_for_backward
from tasks.planning.selector import select_plan

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "initializer_range": 0.1}
WINDOW = 8  # shorter than the rows, so sliding-window layers matter
FAMILY_SETTINGS = {
    "llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}},  # Llama 3.1/3.2 rope scaling
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {},
    "qwen3": {},
    "gemma": {"head_dim": 16},
    "phi3": {},
    "gemma2": {"sliding_window": WINDOW, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 3.0},  # small caps: the soft-capping changes the maths
    "gemma3_text": {"sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 3.0},
    "olmo2": {},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                "logits_scaling": 4.0},
    "smollm3": {"no_rope_layers": [1, 0]},
    "glm4": {},
    "cohere2": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"], "logit_scale": 0.5},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    # causal LMs without a formula or a known layout: the conservative path, and the model's own head
    "starcoder2": {},  # LayerNorm with biases, a plain (ungated) MLP
    "stablelm": {},  # LayerNorm, partial rotary embeddings
    "mamba": {"state_size": 8},  # a state-space model: packing would carry its state across rows
}
# LoRA targets where all-linear does not work: peft refuses Mamba's out_proj (and conv1d)
LORA_TARGETS = {"mamba": "in_proj,x_proj,dt_proj"}
FAMILY_NAMES = list(FAMILY_SETTINGS)
FORMULA_FAMILIES = [f for f in FAMILY_NAMES if f in FAMILIES]


def family_config(model_type: str, tokenizer=None, **overrides):
    from transformers import AutoConfig

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2} if tokenizer is None else {
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    settings = {**SMALL, "vocab_size": 600, **FAMILY_SETTINGS[model_type], **ids, **overrides}
    for per_layer in ("layer_types", "no_rope_layers"):  # the pattern, repeated over the layers
        if per_layer in settings:
            settings[per_layer] = (settings[per_layer] * settings["num_hidden_layers"])[:settings["num_hidden_layers"]]
    return AutoConfig.for_model(model_type, **settings)


@pytest.fixture(scope="module")
def family_model(tiny_model, tmp_path_factory):
    """A folder per family: a tiny random model of it, with the project's tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model))
    built = {}

    def build(model_type: str):
        if model_type not in built:
            folder = tmp_path_factory.mktemp(model_type)
            tokenizer.save_pretrained(folder)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(family_config(model_type, tokenizer)).save_pretrained(folder)
            built[model_type] = folder
        return built[model_type]
    return build


@pytest.fixture(scope="module")
def rows(tiny_tokenizer) -> list[Example]:
    conversations = read_dataset(str(DEMO_DATA / "train.jsonl")).conversations[:8]
    return encode_all(tiny_tokenizer, conversations, 96)


def lora_settings(model_type: str) -> LoraSettings:
    return LoraSettings(r=8, dropout=0.0, target_modules=LORA_TARGETS.get(model_type, "all-linear"))



def _nonzero_lora_b(model) -> None:
    """LoRA's B starts at zero, which leaves lora_A without gradient: give B values (the same in
    every model loaded with the same seed), so both adapters' gradients are compared."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_the_plan_works_from_the_config_json(family_model, model_type):
    from transformers import AutoModelForCausalLM

    folder = family_model(model_type)
    config = json.loads((folder / "config.json").read_text())
    shape = ModelShape.from_config(config, source=str(folder))
    assert shape.verified == (model_type in FAMILIES)
    model = AutoModelForCausalLM.from_pretrained(folder)
    real = sum(p.numel() for p in model.parameters())
    if shape.verified:
        assert shape.parameters == real
    else:  # conservative: never fewer than the model has, every expert included (it takes MLPs as gated)
        assert real <= shape.parameters <= (1.01 if model_type in MOE_MODEL_TYPES else 1.6) * real
    plan = select_plan(shape, budget_bytes=4 * 2**30, budget_source="test", device="cpu", method="auto",
                       longest_row=96, largest_step=8 * 96)
    assert plan.estimate.verified == shape.verified
    assert plan.estimate.basis.startswith("formula" if shape.verified else "conservative, unverified")
    basis = "formula" if shape.verified else "conservative (unverified)"
    assert all(row["estimate"] == basis for row in plan.table())
    assert ("unverified" in plan.reason) != shape.verified


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_estimate_follows_what_the_trainer_keeps(model_type, method):
    """As tests/test_memory.py's check for the first families: the bytes autograd keeps from the
    trainer's forward pass, counted with saved-tensor hooks on CPU, are what the estimator says
    (within 15%); for a family without a formula, the conservative estimate is not below them."""
    from transformers import AutoModelForCausalLM

    from tasks.engine.modeling import prepare_for_training

    # the shape of tests/test_memory.py's check: large enough that per-layer terms dominate
    config = family_config(model_type, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    lora = LoraSettings(r=8, dropout=0.05, target_modules=LORA_TARGETS.get(model_type, "all-linear"))
    model = prepare_for_training(model, method, "cpu", lora, False).train()
    rows = [Example(input_ids=list(range(1, 129)), labels=list(range(1, 129)), truncated=False)] * 2
    kept = bytes_kept_for_backward(model, rows)
    shape = ModelShape.from_config(config.to_dict())
    estimated = kept_for_backward(shape, method, "cpu", 256, False, lora_r=8)
    if shape.verified:
        assert estimated == pytest.approx(kept, rel=0.15)
    else:
        assert kept <= estimated <= 3 * kept


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_packed_equals_padded(family_model, tiny_tokenizer, rows, model_type, method):
    """Packing does not change the model's maths: the trainer's packed loss and gradients equal those of
    one padded batch through the model's own forward (soft-capping, sliding windows, scaled embeddings,
    residuals and logits included)."""
    from tasks.engine.modeling import load_for_training
    from tasks.engine.packing import micro_batches
    from tasks.engine.train_loop import accumulate_gradients

    folder, lora = str(family_model(model_type)), lora_settings(model_type)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(load_for_training(folder, method, "cpu", lora, False))
        if method == "lora":
            _nonzero_lora_b(models[-1])
    reference, packed = models
    tokens = sum(r.trainable_tokens for r in rows)
    expected_loss = padded_loss(reference, rows, tiny_tokenizer.pad_token_id)
    (expected_loss / tokens).backward()
    capacity = 3 * max(len(r.input_ids) for r in rows)  # several rows per micro-batch, several micro-batches
    assert 1 < len(micro_batches(rows, capacity)) < len(rows)
    loss_sum, step_tokens = accumulate_gradients(packed, rows, capacity, "cpu")
    assert step_tokens == tokens
    assert loss_sum == pytest.approx(expected_loss.item(), rel=1e-5)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in packed.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and expected
    if method == "lora":
        assert any("lora_A" in n and g.abs().sum() > 0 for n, g in got.items())
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None, name
            continue
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_lora_training_lowers_the_loss_and_the_merged_model_is_base_plus_adapter(family_model, tiny_tokenizer, rows,
                                                                                   model_type, tmp_path):
    """Through the trainer, then through the export the publish stage runs: the merged model's
    logits equal base + adapter (export_model checks it, and the saved model against it)."""
    from tasks.engine.export import export_model
    from tasks.engine.modeling import load_for_training
    from tasks.engine.train_loop import train

    settings = TrainingSettings(max_steps=6, batch_size=4, learning_rate=2e-2, warmup_steps=0, eval_every=6,
                                lr_schedule="constant")
    torch.manual_seed(0)
    model = load_for_training(str(family_model(model_type)), "lora", "cpu", lora_settings(model_type), False)
    outcome = train(model, rows, rows, settings, token_capacity=4 * 96, device="cpu", best_dir=tmp_path / "best",
                    log=logging.getLogger("test"), progress=False)
    losses = [r["train_loss"] for r in outcome.history]
    assert losses[-1] < 0.85 * losses[0], losses
    folder = str(family_model(model_type))
    verification = export_model(folder, str(tmp_path / "best"), True, tmp_path / "merged", torch.float32,
                                load_tokenizer(folder), ["How do I reset my password?", "Hello there"], "cpu")
    assert verification["merge_max_abs_logit_diff"] <= 1e-3 and verification["saved_top1_agreement"] == 1.0


@pytest.mark.parametrize("model_type", [f for f in FAMILY_NAMES if f != "mamba"])  # bitsandbytes' CPU 4-bit
def test_qlora_forward_and_backward_on_cpu(family_model, rows, model_type):
    """4-bit base (bitsandbytes' CPU path): the packed loss is finite and the adapters get gradients."""
    from tasks.engine.modeling import load_for_training
    from tasks.engine.train_loop import accumulate_gradients

    torch.manual_seed(0)
    model = load_for_training(str(family_model(model_type)), "qlora", "cpu", lora_settings(model_type), False)
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())
    _nonzero_lora_b(model)
    loss_sum, _ = accumulate_gradients(model, rows[:4], 2 * 96, "cpu")
    assert math.isfinite(loss_sum)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in grads.items())


# The models as their config.json files name them (sizes from the published configs).
PUBLISHED = {
    "gemma-2-9b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
                   "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "sliding_window": 4096,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256},
    "gemma-3-1b": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
                   "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512},
    "olmo-2-7b": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "hidden_size": 4096,
                  "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 100352},
    "granite-3.1-8b": {"architectures": ["GraniteForCausalLM"], "model_type": "granite", "hidden_size": 4096,
                       "intermediate_size": 12800, "num_hidden_layers": 40, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "vocab_size": 49155, "tie_word_embeddings": True,
                       "embedding_multiplier": 12.0, "logits_scaling": 16.0, "residual_multiplier": 0.22,
                       "attention_multiplier": 0.0078125},
    "smollm3-3b": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 2048,
                   "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "vocab_size": 128256},
    "glm-4-9b": {"architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "hidden_size": 4096,
                 "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32,
                 "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151552},
    "command-r7b": {"architectures": ["Cohere2ForCausalLM"], "model_type": "cohere2", "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 256000, "sliding_window": 4096, "logit_scale": 0.25},
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                      "num_experts": 128, "num_experts_per_tok": 8},
    "qwen1.5-moe-a2.7b": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
                          "intermediate_size": 5632, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "num_key_value_heads": 16, "vocab_size": 151936, "num_experts": 60, "num_experts_per_tok": 4},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_count_their_parameters(name):
    """Full-size models built on the meta device (no memory): the estimator's parameter count is
    transformers' (a conservative family's is not below it), and LoRA's is peft's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = PUBLISHED[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    real = sum(p.numel() for p in model.parameters())
    shape = ModelShape.from_config(config)
    if shape.verified:
        assert shape.parameters == real
    else:
        assert real <= shape.parameters <= 1.01 * real


@pytest.mark.parametrize("model_type", ["glm4", "qwen2_moe", "qwen3_moe", "mixtral", "cohere2"])
def test_lora_parameter_count_matches_peft(model_type):
    from transformers import AutoModelForCausalLM

    from tasks.engine.modeling import attach_lora

    config = family_config(model_type)
    model = attach_lora(AutoModelForCausalLM.from_config(config), LoraSettings(r=8, dropout=0.0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config(config.to_dict()).lora_parameters(8) == trainable


def test_the_plan_command_takes_every_family_and_refuses_what_is_no_causal_lm(tmp_path, capsys):
    from tasks.cli import main

    for name, config in PUBLISHED.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert main(["plan", "--model", str(tmp_path / name), "--gpu-gib", "80", "141", "--gpus", "2"]) == 0, name
        out = capsys.readouterr().out
        assert f"model: {config['model_type']}" in out
        assert ("estimate conservative, unverified" in out) == (config["model_type"] not in FAMILIES), out
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps(
        {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522}))
    assert main(["plan", "--model", str(tmp_path / "bert"), "--gpu-gib", "80"]) == 1
    assert "name no causal LM" in (err := capsys.readouterr().err) and "ForCausalLM" in err


def test_causal_lm_families_are_transformers_causal_lms():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tasks.planning.memory import CAUSAL_LM_MODEL_TYPES

    assert [t for t in CAUSAL_LM_MODEL_TYPES if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES] == []
    assert set(MOE_MODEL_TYPES) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("scale, softcap", [(0.25, None), (1.0, 3.0), (0.5, 2.0)], ids=["scale", "softcap", "both"])
@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_loss_applies_the_logit_transforms(monkeypatch, scale, softcap, head_trains):
    import tasks.engine.loss
    from tasks.engine.loss import linear_cross_entropy_sum

    monkeypatch.setattr(tasks.engine.loss, "CHUNK_BYTES", 4 * 50 * 7)  # 7 rows per chunk: several chunks
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=head_trains)
    targets = torch.randint(0, 50, (30,))
    logits = (hidden @ weight.T) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    wrt = [hidden, weight] if head_trains else [hidden]
    expected_grads = torch.autograd.grad(expected, wrt)
    got = linear_cross_entropy_sum(hidden, weight, targets, torch.float32, scale=scale, softcap=softcap)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, wrt), expected_grads):
        torch.testing.assert_close(g, e)
    with torch.no_grad():  # evaluation's path
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, torch.float32, scale, softcap),
                                   expected)


@pytest.mark.parametrize("model_type, exact", [("starcoder2", True), ("stablelm", True), ("mamba", False)])
def test_packing_is_checked_on_families_the_project_has_not(family_model, model_type, exact):
    """A family without a formula gets its packing measured when loaded: a state-space model carries
    its state across rows, so its rows then run one at a time (test_packed_equals_padded holds either way)."""
    from tasks.engine.attention import PACKING_EXACT
    from tasks.engine.modeling import load_for_training

    model = load_for_training(str(family_model(model_type)), "lora", "cpu", lora_settings(model_type), False)
    assert getattr(model, PACKING_EXACT) is exact


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("model_type", ["gemma2", "qwen3_moe"])
def test_the_whole_flow_takes_a_new_family(family_model, tmp_path, model_type):
    """ingest -> plan -> train -> evaluate -> publish on a family the project did not take before; the
    manifest says whether the plan's estimate was a formula or a conservative, unverified one."""
    from conftest import tiny_config
    from flows.finetune import finetune

    result = finetune(tiny_config(family_model(model_type), tmp_path, method="lora"))
    manifest = json.loads((tmp_path / "out" / "runs" / result.run_id / "manifest.json").read_text())
    estimate = manifest["plan"]["estimate"]
    assert estimate["verified"] == (model_type in FAMILIES)
    assert ("unverified" in manifest["plan"]["reason"]) == (model_type not in FAMILIES)
    assert manifest["export"]["merge_max_abs_logit_diff"] < 1e-3
    assert result.tuned_eval_loss < result.base_eval_loss


README_TABLE = "| family (`model_type`) |"
GPU_MEMORY_POINTS = ("gpu_memory_h200_2026-11-29.jsonl", "gpu_memory_h200_2026-11-29_validation.jsonl",
                     "gpu_memory_h200_2026-12-01_new_families.jsonl")
# issue 16's families, measured in the last of those files
NEW_FAMILY_TYPES = ("gemma2", "gemma3_text", "olmo2", "granite", "smollm3", "cohere2", "glm4", "mixtral", "qwen3_moe")


def readme_support_table() -> list[dict]:
    """The README's model-family support table: one dict per row, keyed by the header's names."""
    text = (ROOT / "README.md").read_text()
    start = text.index(README_TABLE)
    header, _, *rows = text[start:text.index("\n\n", start)].splitlines()
    return [dict(zip(_cells(header), _cells(row))) for row in rows]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def test_every_family_in_the_readme_table_has_its_cpu_tests():
    """The table's claim "CPU tests": each family it lists is one this file's tests run (FAMILY_NAMES), and
    each family tested here is in the table."""
    listed = []
    for row in readme_support_table():
        family, cpu = row["family (`model_type`)"], row["CPU tests"]
        # the catch-all row names examples; its CPU column says which of them are tested ("starcoder2, stablelm: ...")
        tested = re.findall(r"[a-z0-9_]+", cpu.split(":")[0]) if "e.g." in family else re.findall(r"`(\w+)`", family)[:1]
        assert tested and set(tested) <= set(FAMILY_NAMES), f"README row {family!r}: no CPU tests for {tested}"
        listed += tested
    assert sorted(listed) == sorted(FAMILY_NAMES)


def measured_errors(files: tuple[str, ...] = GPU_MEMORY_POINTS) -> dict[str, list[float]]:
    """Per model_type, the estimate's error against each H200 peak in the committed results, recomputed with the
    estimator as it is now (benchmarks/gpu_memory.py's own `table` arithmetic)."""
    spec = importlib.util.spec_from_file_location("gpu_memory_benchmark", ROOT / "benchmarks" / "gpu_memory.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    errors: dict[str, list[float]] = {}
    for name in files:
        for line in (ROOT / "benchmarks" / "results" / name).read_text().splitlines():
            point = json.loads(line) if line.strip() else {}
            if "shape" in point and "error" not in point:
                errors.setdefault(point["config"]["model_type"], []).append(
                    benchmark.estimate_for(point).total / point["measured_bytes"] - 1)
    return errors


def test_the_readme_gpu_memory_column_is_what_the_committed_h200_points_give():
    errors = measured_errors()
    for row in readme_support_table():
        model_type = re.findall(r"`(\w+)`", row["family (`model_type`)"])[0]
        cell, found = row["GPU memory: estimate vs H200 peak"], errors.get(model_type, [])
        if not found:
            assert cell.startswith("not measured"), f"{model_type}: {cell!r}, but no point was measured"
            continue
        low, high = min(found), max(found)
        span = f"{low * 100:+.1f}%" + (f" to {high * 100:+.1f}%" if len(found) > 1 else "")
        count = f"{len(found)} point{'s' if len(found) > 1 else ''}"
        assert cell.startswith(count) and cell.endswith(f": {span}"), f"{model_type}: README {cell!r}, results {count}: {span}"
    new = [e for t, found in errors.items() if t in NEW_FAMILY_TYPES for e in found]
    assert len(new) == 14 and all(abs(e) <= 0.10 for e in new)  # the README's "14 points, all within ±10%"



def test_bf16_full_fine_tuning_estimates_are_within_ten_percent_of_the_h200_peaks():
    """full_precision bf16 (README, "Speed at a memory budget"): its 7 committed H200 points, 0.5B to 8B,
    with and without checkpointing, are each within 10% of the estimate as it is now."""
    errors = [e for found in measured_errors(("gpu_memory_h200_2026-12-01_full_bf16.jsonl",)).values() for e in found]
    assert len(errors) == 7 and all(abs(e) <= 0.10 for e in errors)
