"""A mixture of experts reports its router's load-balancing loss, and trains on it only as transformers would."""
import logging

import pytest
import torch
from test_model_families import family_config

from tasks.config import LoraSettings, TrainingSettings
from tasks.data.tokenization import Example
from tasks.engine.modeling import prepare_for_training
from tasks.engine.router_balance import add_balance_loss, step_balance_loss
from tasks.engine.train_loop import summed_loss, train
from tasks.engine.packing import pack

ROWS = [Example(input_ids=list(range(3, 3 + n)), labels=list(range(3, 3 + n)), truncated=False) for n in (40, 56, 24)]


def moe(model_type: str, method: str, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **overrides))
    return prepare_for_training(model, method, "cpu", LoraSettings(r=8, dropout=0.0), False).train()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_training_steps_report_the_router_balance_loss(model_type, tmp_path):
    model = moe(model_type, "lora")
    settings = TrainingSettings(max_steps=2, batch_size=3, eval_every=2, early_stopping_patience=0,
                                learning_rate=1e-3)
    outcome = train(model, ROWS, ROWS[:1], settings, 64, "cpu", tmp_path / "best", logging.getLogger("test"),
                    progress=False)
    balances = [r["router_balance_loss"] for r in outcome.history]
    # num_experts x sum(token share x mean probability): top-k (2) when perfectly even, up to 4 here
    assert all(1.0 < b < 4.0 for b in balances)
    evaluation = summed_loss(model.eval(), pack(ROWS), "cpu")
    assert torch.isfinite(evaluation) and step_balance_loss(model) is None  # evaluation measures nothing


def test_the_balance_loss_joins_the_objective_only_when_the_config_asks_and_the_router_trains():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    packed = pack(ROWS)
    gradients = {}
    for asked in (False, True):
        model = moe("mixtral", "full", output_router_logits=asked, router_aux_loss_coef=0.5)
        summed_loss(model, packed, "cpu").backward()
        gradients[asked] = model.model.layers[0].mlp.gate.weight.grad.clone()
        readings = step_balance_loss(model)
    assert not torch.allclose(gradients[False], gradients[True])  # the balance term moves the router
    # and by exactly coef x tokens x d(balance): what HF's loss + coef * aux gives per answer token
    model = moe("mixtral", "full")
    outputs = model.get_decoder()(input_ids=torch.tensor([packed.input_ids]),
                                  position_ids=torch.tensor([packed.position_ids]), output_router_logits=True)
    balance = load_balancing_loss_func(outputs.router_logits, 4, 2)
    (0.5 * balance * packed.trainable_tokens).backward()
    torch.testing.assert_close(gradients[True] - gradients[False], model.model.layers[0].mlp.gate.weight.grad,
                               rtol=1e-4, atol=1e-6)
    assert readings == pytest.approx(float(balance.detach()), rel=1e-5)
    lora = moe("mixtral", "lora", output_router_logits=True, router_aux_loss_coef=0.5)
    loss = torch.tensor(1.0)
    assert add_balance_loss(lora, outputs, loss, 10) is loss  # a frozen router: reported, not trained
