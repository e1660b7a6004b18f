"""Preference tuning through the whole flow (real temporary Prefect server, tiny model): DPO and ORPO
train, are evaluated on held-out pairs against the base, gated on preference accuracy and published;
an objective that does not fit the rows stops in ingest with the fix."""
import json

import pytest

from conftest import DEMO_DATA, tiny_config
from flows.finetune import finetune

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def preference_config(model, tmp_path, **overrides):
    settings = {"data": str(DEMO_DATA / "preference_train.jsonl"), "eval_data": str(DEMO_DATA / "preference_eval.jsonl"),
                "objective": "dpo", "preference": {"beta": 0.5},
                "evaluation": {"max_new_tokens": 8, "max_generation_rows": 2, "metric": "preference_accuracy"}}
    return tiny_config(model, tmp_path, **{**settings, **overrides})


@pytest.mark.parametrize("objective, method", [("dpo", "full"), ("orpo", "lora")])
def test_preference_objectives_train_evaluate_gate_and_publish(tiny_model, tmp_path, objective, method):
    result = finetune(preference_config(tiny_model, tmp_path, objective=objective, method=method))
    base, tuned = result.scores["base"], result.scores["tuned"]
    assert result.metric == "preference_accuracy" and result.method == method
    assert base["preference_accuracy"] == 0.0 and base["reward_margin"] == 0.0  # the base is its own reference
    assert tuned["preference_accuracy"] > 0.5 and tuned["reward_margin"] > 0
    assert 0 <= tuned["logp_accuracy"] <= 1 and tuned["chosen_logps"] < 0 and tuned["rejected_logps"] < 0
    assert {"chosen_logps", "rejected_logps", "exact_match"} <= set(tuned)  # generation metrics vs the chosen answer
    assert result.promoted and "preference_accuracy: tuned" in result.gate
    manifest = json.loads((tmp_path / "out" / "runs" / result.run_id / "manifest.json").read_text())
    history = manifest["training"]["history"]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    assert "reward_accuracy" in history[-1] and min(evals) < history[0]["train_loss"]  # held out, below the start


def test_preference_rows_with_objective_sft_stop_in_ingest_with_the_fix(tiny_model, tmp_path):
    state = finetune(preference_config(tiny_model, tmp_path, objective="sft", evaluation={}), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "preference_train.jsonl: the rows are preference pairs" in message
    assert "set objective to 'dpo' or 'orpo'" in message
    assert not (tmp_path / "out").exists()


def test_objective_dpo_on_chat_rows_stops_in_ingest_with_the_fix(tiny_model, tmp_path):
    state = finetune(tiny_config(tiny_model, tmp_path, objective="dpo"), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "objective 'dpo' learns from preference pairs, but the rows are chat rows" in message
    assert "or set objective to 'sft'" in message
