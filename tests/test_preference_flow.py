"""Preference tuning through the whole flow (real temporary Prefect server, tiny model): DPO and ORPO
train, are evaluated on held-out pairs against the base, gated on preference accuracy and published;
an objective that does not fit the rows stops in ingest with the fix; DPO starts from a published SFT run
(`model: run:<id>`)."""
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


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return {name: tensor for path in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(path).items()}


def test_dpo_starts_from_a_published_sft_run(tiny_model, tmp_path):
    """`model: run:<id>`: DPO with LoRA trains from the SFT run's merged model (its reference is that model with
    the adapter off); the manifest, the model card and the adapter name that run and its own base. A run that is
    not in the registry stops the flow before anything is trained, naming the run and the fix."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = finetune(tiny_config(tiny_model, tmp_path, method="full"))  # published (and promoted)
    runs = tmp_path / "out" / "runs"
    sft_merged = runs / sft.run_id / "merged"
    dpo = finetune(preference_config(f"run:{sft.run_id}", tmp_path, method="lora"))
    assert dpo.method == "lora" and dpo.scores["base"]["preference_accuracy"] == 0.0  # base == reference == SFT
    manifest = json.loads((runs / dpo.run_id / "manifest.json").read_text())
    assert manifest["config"]["model"] == f"run:{sft.run_id}" and manifest["config"]["objective"] == "dpo"
    started = manifest["base_model"]["run"]
    assert (started["run_id"], started["objective"], started["method"]) == (sft.run_id, "sft", "full")
    assert started["base_model"]["path"] == str(tiny_model)  # the SFT run's own base
    card = (runs / dpo.run_id / "merged" / "README.md").read_text()
    assert f"The base is run `{sft.run_id}`" in card and f"base_model: {sft_merged}\n" in card
    assert f"`prefect-finetune download {tmp_path / 'out'} --run {sft.run_id}`" in card

    # LoRA leaves embeddings and norms alone: in the DPO model they are the SFT model's, which full fine-tuning
    # moved away from the tiny base's; the adapted projections moved on from the SFT model's
    tiny, sft_weights, dpo_weights = _weights(tiny_model), _weights(sft_merged), _weights(runs / dpo.run_id / "merged")
    untouched = [n for n in dpo_weights if "proj" not in n]
    assert untouched and all(torch.equal(dpo_weights[n], sft_weights[n]) for n in untouched)
    assert any(not torch.equal(sft_weights[n], tiny[n]) for n in untouched)
    assert any(not torch.equal(dpo_weights[n], sft_weights[n]) for n in dpo_weights if "proj" in n)
    # the published adapter names the SFT run's merged folder as its base, and on it gives the DPO model
    adapter = runs / dpo.run_id / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_merged)
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_merged), adapter).merge_and_unload()
    for name, value in rebuilt.state_dict().items():
        if name in dpo_weights:
            torch.testing.assert_close(value, dpo_weights[name], rtol=1e-5, atol=1e-6, msg=name)

    published = sorted(p.name for p in runs.iterdir())
    state = finetune(preference_config("run:20261201-000000-missing", tmp_path), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "no run '20261201-000000-missing' is published in output=" in message and "run:latest" in message
    assert sorted(p.name for p in runs.iterdir()) == published  # nothing half published


def test_a_dpo_run_from_an_sft_run_continues_from_its_checkpoint_with_resume(tiny_model, tmp_path):
    """A later DPO run with `resume: true` continues from the last checkpoint of one that trained the same base
    (the SFT run's download, found complete in work_dir: the same folder, so the same identity), pairs and
    settings; another beta trains something else, so it starts afresh."""
    sft = finetune(tiny_config(tiny_model, tmp_path, method="lora"))
    checkpoints = tmp_path / "out" / "checkpoints"
    before = {p.name for p in checkpoints.iterdir()}  # the SFT run's own
    training = {"learning_rate": 3e-3, "lr_schedule": "constant", "batch_size": 8, "max_seq_len": 128,
                "eval_every": 2, "early_stopping_patience": 0, "checkpoint_every": 2}
    base = f"run:{sft.run_id}"
    finetune(preference_config(base, tmp_path, method="lora", training={**training, "max_steps": 4}))
    (run_key,) = {p.name for p in checkpoints.iterdir()} - before
    assert sorted(p.name for p in (checkpoints / run_key).iterdir()) == ["step-0000002", "step-0000004"]

    second = finetune(preference_config(base, tmp_path, method="lora", resume=True,
                                        training={**training, "max_steps": 6}))
    manifest = json.loads((tmp_path / "out" / "runs" / second.run_id / "manifest.json").read_text())
    assert manifest["base_model"]["run"]["run_id"] == sft.run_id
    assert manifest["training"]["resumed_from"] == str(checkpoints / run_key / "step-0000004")
    history = manifest["training"]["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6] and "reward_accuracy" in history[-1]
    assert [r["step"] for r in history if "eval_loss" in r] == [2, 4, 6]
    assert second.scores["tuned"]["preference_accuracy"] > 0.5

    third = finetune(preference_config(base, tmp_path, method="lora", resume=True, preference={"beta": 0.2},
                                       training={**training, "max_steps": 2}))
    manifest = json.loads((tmp_path / "out" / "runs" / third.run_id / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == 0 and manifest["training"]["resumed_from"] is None


def test_dpo_starts_from_the_promoted_run_of_an_s3_output(tiny_model, bucket, tmp_path):
    """`model: run:latest` with output on S3 (moto over HTTP): the promoted SFT run's merged model comes down
    into work_dir, checked against the manifest latest.json was promoted with, and DPO trains from it."""
    from tasks.store.objects import read_object

    output = f"s3://{bucket}/models/q7"
    sft = finetune(tiny_config(tiny_model, tmp_path, method="lora", output=output))
    assert sft.promoted
    dpo = finetune(preference_config("run:latest", tmp_path, method="lora", output=output))
    manifest = json.loads(read_object(f"{output}/runs/{dpo.run_id}/manifest.json").data)
    started = manifest["base_model"]["run"]
    assert (started["run_id"], started["requested"], started["output"]) == (sft.run_id, "run:latest", output)
    assert started["promoted_at"] and manifest["config"]["model"] == "run:latest"
    local = tmp_path / "work" / "base-runs" / sft.run_id
    assert manifest["base_model"]["path"] == str(local / "merged")
    sft_manifest = json.loads((local / "manifest.json").read_text())
    merged = [e for e in sft_manifest["files"] if e["path"].startswith("merged/")]
    assert merged and all((local / e["path"]).stat().st_size == e["bytes"] for e in merged)
    assert dpo.promoted and dpo.scores["tuned"]["preference_accuracy"] > 0.5
