"""Preference training in the project's own train loop, on the tiny model: a DPO step with LoRA moves
only the adapter and lowers the loss on its pairs; the cached reference log-probs are the
adapter-disabled model's; ORPO trains every weight with full fine-tuning; the plan counts DPO's
frozen reference copy."""
import logging

import pytest
import torch

from tasks.data.preference import PreferencePair, encode_pairs
from tasks.engine.preference import pair_logps
from tasks.engine.preference_training import PreferenceObjective
from tasks.engine.train_loop import train
from tasks.planning.memory import ModelShape, estimate_memory
from tasks.planning.methods import Method
from tasks.planning.settings import LoraSettings, PreferenceSettings, TrainingSettings

QUESTIONS = ["What is the Quillfeather Q7?", "How long does the battery last?", "Is it waterproof?",
             "What colour is it?", "How heavy is it?", "Who makes it?"]
PAIRS = [PreferencePair([{"role": "user", "content": q}], "Quill says: yes, it is fine.",
                        f"I cannot say anything about {q.lower()} sorry.") for q in QUESTIONS]
LOG = logging.getLogger("test")


def lora_model(path, dropout: float = 0.0):
    from tasks.engine.modeling import load_for_training

    return load_for_training(str(path), Method.LORA, "cpu", LoraSettings(r=8, alpha=16, dropout=dropout), False)


def settings(**changes) -> TrainingSettings:
    return TrainingSettings(**{"learning_rate": 5e-3, "max_steps": 6, "batch_size": 4, "eval_every": 3,
                               "lr_schedule": "constant", "early_stopping_patience": 0, **changes})


def test_dpo_with_lora_trains_the_adapter_only_and_lowers_the_loss(tiny_model, tiny_tokenizer, tmp_path):
    pairs = encode_pairs(tiny_tokenizer, PAIRS, 128)
    model = lora_model(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = PreferenceObjective("dpo", PreferenceSettings(beta=0.5), "cpu")
    start = objective.eval_loss(model, pairs, 4096)
    assert start == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: -log sigmoid(0)
    outcome = train(model, pairs, pairs, settings(), 4096, "cpu", tmp_path / "best", LOG, progress=False,
                    objective=objective)
    assert outcome.steps == 6 and outcome.trained_tokens > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)  # the base is frozen
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    end = objective.eval_loss(model, pairs, 4096)
    assert end < start - 0.1
    assert outcome.history[-1]["reward_accuracy"] > 0.5
    # every pair's reference was computed once (first sight), then read from the cache
    assert len(objective.cache) == len(pairs)


def test_cached_reference_log_probs_are_the_adapter_disabled_models(tiny_model, tiny_tokenizer, tmp_path):
    pairs = encode_pairs(tiny_tokenizer, PAIRS, 128)
    model = lora_model(tiny_model, dropout=0.1)  # dropout on: the reference must still be the eval-mode base
    objective = PreferenceObjective("dpo", PreferenceSettings(), "cpu")
    train(model, pairs, pairs, settings(max_steps=3), 4096, "cpu", tmp_path / "best", LOG, progress=False,
          objective=objective)
    passes = objective.reference_passes
    cached = objective.reference_scores(model, pairs)
    assert objective.reference_passes == passes  # nothing recomputed
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        direct = pair_logps(model, pairs, "cpu")
        policy_off = (direct.chosen.clone(), direct.rejected.clone())
    with torch.no_grad():
        policy = pair_logps(model, pairs, "cpu")
    # summed over ~40 tokens in other packings: fp32 rounding only
    torch.testing.assert_close(cached.chosen, policy_off[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cached.rejected, policy_off[1], rtol=1e-6, atol=1e-5)
    assert not torch.allclose(policy.chosen, cached.chosen, atol=1e-3)  # the adapter did train


def test_orpo_full_fine_tuning_trains_every_weight_without_a_reference(tiny_model, tiny_tokenizer, tmp_path):
    from tasks.engine.modeling import load_for_training

    pairs = encode_pairs(tiny_tokenizer, PAIRS, 128)
    model = load_for_training(str(tiny_model), Method.FULL, "cpu", LoraSettings(), False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = PreferenceObjective("orpo", PreferenceSettings(orpo_lambda=0.5), "cpu")
    start = objective.eval_loss(model, pairs, 4096)
    train(model, pairs, pairs, settings(learning_rate=1e-3), 4096, "cpu", tmp_path / "best", LOG, progress=False,
          objective=objective)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert objective.eval_loss(model, pairs, 4096) < start
    assert objective.reference_passes == 0 and not objective.cache
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_full_dpo_in_bf16_keeps_a_bf16_reference_and_learns(tiny_model, tiny_tokenizer, tmp_path):
    """full_precision bf16 with DPO: the policy's weights and the frozen reference are both bf16 (what the
    plan counts), and the rounding AdamW lowers the DPO loss on the pairs."""
    from tasks.engine.modeling import load_for_training
    from tasks.engine.preference_training import build_objective

    pairs = encode_pairs(tiny_tokenizer, PAIRS, 128)
    model = load_for_training(str(tiny_model), Method.FULL, "cpu", LoraSettings(), False, full_precision="bf16")
    objective = build_objective("dpo", PreferenceSettings(beta=0.5), Method.FULL, "cpu", str(tiny_model),
                                full_precision="bf16")
    assert {p.dtype for p in objective.reference.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in objective.reference.parameters())
    start = objective.eval_loss(model, pairs, 4096)
    train(model, pairs, pairs, settings(learning_rate=1e-3), 4096, "cpu", tmp_path / "best", LOG, progress=False,
          objective=objective)
    assert objective.eval_loss(model, pairs, 4096) < start - 0.05


def test_micro_batches_give_the_gradient_of_the_whole_step(tiny_model, tiny_tokenizer):
    """A step cut into micro-batches (a small token capacity) accumulates the gradient of one batch."""
    pairs = encode_pairs(tiny_tokenizer, PAIRS[:4], 128)
    grads = []
    for capacity in (4096, max(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        model = lora_model(tiny_model)
        for name, parameter in model.named_parameters():  # B = 0 would make A's gradient 0
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        objective = PreferenceObjective("dpo", PreferenceSettings(), "cpu")
        objective.accumulate(model, pairs, capacity)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_memory_estimate_counts_the_reference_copy_of_full_dpo_only():
    shape = ModelShape.from_config({"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
                                    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                                    "num_key_value_heads": 4, "max_position_embeddings": 2048})
    args = ("cuda", 4096, False)
    sft, dpo, orpo = (estimate_memory(shape, Method.FULL, *args, objective=o) for o in ("sft", "dpo", "orpo"))
    assert dpo.weights - sft.weights == 4 * shape.parameters  # the frozen fp32 reference
    assert dpo.total - orpo.total == 4 * shape.parameters + (dpo.overhead - orpo.overhead)
    lora_sft, lora_dpo = (estimate_memory(shape, Method.LORA, *args, objective=o) for o in ("sft", "dpo"))
    assert lora_dpo.weights == lora_sft.weights  # the adapter switched off is the reference: no copy
    assert lora_dpo.logits > lora_sft.logits  # log-probs through the model's own head, not the fused loss


def test_the_selector_steps_down_when_the_reference_copy_does_not_fit():
    from tasks.planning.selector import select_plan

    shape = ModelShape.from_config({"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
                                    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                                    "num_key_value_heads": 4, "max_position_embeddings": 2048})
    common = dict(budget_source="test", device="cuda", method="auto", longest_row=1024, largest_step=1024,
                  gradient_checkpointing="on", full_precision="fp32")  # one configuration per method
    sft = select_plan(shape, budget_bytes=int(1e12), objective="sft", **common)
    budget = sft.estimate.total + shape.parameters  # full sft fits; its fp32 reference copy would not
    assert select_plan(shape, budget_bytes=budget, objective="sft", **common).method == Method.FULL
    assert select_plan(shape, budget_bytes=budget, objective="dpo", **common).method == Method.LORA
    assert select_plan(shape, budget_bytes=budget, objective="orpo", **common).method == Method.FULL
