"""The training loop on a tiny model: what changes, what stays frozen, and that it learns."""
import logging

import pytest
import torch

from conftest import DEMO_DATA
from tasks.config import LoraSettings, TrainingSettings
from tasks.data.tokenization import encode_all
from tasks.data.validation import read_dataset
from tasks.engine.modeling import load_for_training
from tasks.engine.train_loop import accumulate_gradients, mean_loss, train

LOG = logging.getLogger("test")


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    train_rows = read_dataset(str(DEMO_DATA / "train.jsonl")).conversations
    eval_rows = read_dataset(str(DEMO_DATA / "eval.jsonl")).conversations
    return encode_all(tiny_tokenizer, train_rows, 128), encode_all(tiny_tokenizer, eval_rows, 128)


def run(model, examples, tmp_path, capacity=8 * 128, **settings):
    defaults = {"learning_rate": 3e-3, "lr_schedule": "constant", "max_steps": 10, "batch_size": 8,
                "eval_every": 5, "early_stopping_patience": 0}
    return train(model, *examples, TrainingSettings(**{**defaults, **settings}), capacity, "cpu",
                 tmp_path / "best", LOG, progress=False)


def snapshot(model, trainable: bool) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_learn_and_the_base_stays_frozen(tiny_model, tiny_tokenizer, examples, tmp_path, method):
    model = load_for_training(str(tiny_model), method, "cpu", LoraSettings(r=8, dropout=0.0), False)
    adapters, frozen = snapshot(model, True), snapshot(model, False)
    assert adapters and all("lora_" in name for name in adapters)
    before = mean_loss(model, examples[1], 8 * 128, "cpu")
    outcome = run(model, examples, tmp_path, learning_rate=3e-2)
    after_adapters, after_frozen = snapshot(model, True), snapshot(model, False)
    assert all(not torch.equal(adapters[n], after_adapters[n]) for n in adapters if "lora_B" in n)
    assert all(torch.equal(frozen[n], after_frozen[n]) for n in frozen)
    assert outcome.best_eval_loss < before - 0.2  # held-out loss fell
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_updates_every_weight(tiny_model, tiny_tokenizer, examples, tmp_path):
    model = load_for_training(str(tiny_model), "full", "cpu", LoraSettings(), False)
    before = snapshot(model, True)
    outcome = run(model, examples, tmp_path)
    after = snapshot(model, True)
    assert len(before) == len(list(model.parameters()))
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert outcome.history[-1]["eval_loss"] < outcome.history[4]["eval_loss"]
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_bf16_full_fine_tuning_learns_with_the_rounding_adamw(tiny_model, tiny_tokenizer, examples, tmp_path):
    """full_precision bf16: the weights load in bf16, the loop trains them with Bf16AdamW (no fp32 copy
    anywhere), every weight moves, the held-out loss falls as with fp32 master weights, and a checkpoint
    saves and resumes the optimizer's bf16 moments."""
    from tasks.engine.bf16_adamw import Bf16AdamW
    from tasks.engine.train_loop import adamw_for

    model = load_for_training(str(tiny_model), "full", "cpu", LoraSettings(), False, full_precision="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert isinstance(adamw_for(list(model.parameters()), TrainingSettings(), "cpu"), Bf16AdamW)
    before = snapshot(model, True)
    outcome = run(model, examples, tmp_path)
    after = snapshot(model, True)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert outcome.history[-1]["eval_loss"] < outcome.history[4]["eval_loss"] - 0.2
    fp32 = load_for_training(str(tiny_model), "full", "cpu", LoraSettings(), False)
    reference = run(fp32, examples, tmp_path / "fp32")
    assert outcome.best_eval_loss == pytest.approx(reference.best_eval_loss, rel=0.05)


def test_accumulation_weighs_tokens_like_one_big_batch(tiny_model, tiny_tokenizer, examples):
    rows = examples[0][:8]  # rows of different lengths and answer sizes
    gradients = []
    for capacity in (8 * 128, 3 * 128, 128):  # one micro-batch, a few, one row each
        model = load_for_training(str(tiny_model), "full", "cpu", LoraSettings(), False)
        accumulate_gradients(model, rows, capacity, "cpu")
        gradients.append({n: p.grad for n, p in model.named_parameters()})
    for other in gradients[1:]:
        for name, grad in gradients[0].items():
            torch.testing.assert_close(other[name], grad, atol=1e-6, rtol=1e-4)


def test_checkpointing_gives_the_same_training(tiny_model, tiny_tokenizer, examples, tmp_path):
    losses = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times (as the train task seeds before loading)
        model = load_for_training(str(tiny_model), "lora", "cpu", LoraSettings(r=8, dropout=0.0), checkpointing)
        outcome = run(model, examples, tmp_path / str(checkpointing), max_steps=3,
                      eval_every=3)
        losses.append([r["train_loss"] for r in outcome.history])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_some_layers_gives_the_same_loss_and_gradients(method, tiny_model, examples):
    """Checkpointing only the first layers (the planner's way to fit a larger micro-batch) changes
    what is kept, not the maths: the loss and every trainable gradient equal the plain path's."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tasks.engine.modeling import checkpoint_layers

    results = []
    for checkpointed in (0, 1, None):
        torch.manual_seed(0)
        model = load_for_training(str(tiny_model), method, "cpu", LoraSettings(r=8, dropout=0.0), False).train()
        if method == "lora":  # a non-zero B, so lora_A's gradients are compared too
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(std=0.02)
        layers = checkpoint_layers(model, checkpointed)
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert sum(flags) == layers and flags == sorted(flags, reverse=True)  # the first layers, none after a plain one
        loss, _ = accumulate_gradients(model, examples[0][:8], 4 * 128, "cpu")
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads))
    (plain_loss, plain), *checkpointed_runs = results
    assert len(plain) > 0 and all(g.abs().sum() > 0 for g in plain.values() if g.dim() > 1)
    for loss, grads in checkpointed_runs:
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        for name, gradient in plain.items():
            torch.testing.assert_close(grads[name], gradient, rtol=1e-5, atol=1e-7)


def test_early_stopping_keeps_the_best_checkpoint(tiny_model, tiny_tokenizer, examples, tmp_path):
    # A learning rate this high makes eval loss worse after the first evaluations.
    model = load_for_training(str(tiny_model), "full", "cpu", LoraSettings(), False)
    outcome = run(model, examples, tmp_path, learning_rate=0.5, max_steps=40,
                  eval_every=1, early_stopping_patience=2)
    evals = [r["eval_loss"] for r in outcome.history if "eval_loss" in r]
    assert outcome.stopped_early and outcome.steps < 40
    assert outcome.best_eval_loss == min(evals)
    assert evals[-1] > outcome.best_eval_loss and evals[-2] > outcome.best_eval_loss
    # What gets published is the best checkpoint, not the last weights: reloaded, it scores the best loss.
    best = load_for_training(str(tmp_path / "best"), "full", "cpu", LoraSettings(), False)
    assert mean_loss(best, examples[1], 8 * 128, "cpu") == pytest.approx(outcome.best_eval_loss, rel=1e-5)
    assert mean_loss(model, examples[1], 8 * 128, "cpu") == pytest.approx(evals[-1], rel=1e-5)


def test_early_stopping_on_a_crafted_curve():
    from tasks.engine.train_loop import EarlyStopping

    stopping = EarlyStopping(patience=2, min_delta=0.01)
    decisions = [(stopping.improved(step, loss), stopping.should_stop)
                 for step, loss in [(1, 2.0), (2, 1.5), (3, 1.495), (4, 1.7)]]
    assert decisions == [(True, False), (True, False), (False, False), (False, True)]
    assert (stopping.best_step, stopping.best_loss) == (2, 1.5)
    nan_only = EarlyStopping(patience=0)
    assert not nan_only.improved(1, float("nan")) and nan_only.best_step == 0 and not nan_only.should_stop


def test_overfitting_is_warned_once_when_eval_loss_climbs_as_train_loss_falls(caplog):
    from tasks.engine.train_loop import _warn_if_overfitting

    train_losses = [3.0, 2.5, 2.0, 1.6, 1.2, 0.9, 0.6, 0.4]
    evals = {2: 2.4, 4: 2.0, 6: 2.3, 8: 2.6}  # best at step 4, then +15%, +30%
    history = []
    with caplog.at_level(logging.WARNING, logger="test"):
        for step, loss in enumerate(train_losses, start=1):
            history.append({"step": step, "train_loss": loss, **({"eval_loss": evals[step]} if step in evals else {})})
            if step in evals:
                _warn_if_overfitting(LOG, history)
    warnings = [r.getMessage() for r in caplog.records if "overfitting" in r.getMessage()]
    assert len(warnings) == 1 and "eval loss rose from 2.0000 (step 4) to 2.3000 (step 6, +15%)" in warnings[0]
    assert [r["step"] for r in history if r.get("overfitting")] == [6]
