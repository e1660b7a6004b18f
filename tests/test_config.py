import pytest
from pydantic import ValidationError

from tasks.config import FinetuneConfig


def test_defaults_are_valid():
    config = FinetuneConfig(model="m", data="d.jsonl")
    assert config.method == "auto" and config.lora.target_list() == "all-linear"


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValidationError) as caught:
        FinetuneConfig(model="m", data="s3://bucket-only", eval_data="e.txt", method="lorra",
                       training={"learning_rate": -1, "learning_rte": 1e-4})
    text = str(caught.value)
    for expected in ("method", "learning_rate", "learning_rte", "Extra inputs"):
        assert expected in text


def test_location_rules_collected_in_one_error():
    with pytest.raises(ValidationError) as caught:
        FinetuneConfig(model=" ", data="s3://bucket-only", eval_data="e.txt", output="s3://")
    text = str(caught.value)
    assert "names a bucket but no object" in text
    assert "unsupported suffix" in text
    assert "has no bucket" in text
    assert "model is empty" in text


def test_lora_target_list():
    config = FinetuneConfig(model="m", data="d.csv", lora={"target_modules": "q_proj, v_proj"})
    assert config.lora.target_list() == ["q_proj", "v_proj"]


def test_flow_parameters_render_as_a_typed_form():
    from flows.finetune import finetune

    schema = finetune.parameters.model_dump()
    assert schema["required"] == ["config"]
    definitions = schema["definitions"]
    config = definitions["FinetuneConfig"]["properties"]
    method = definitions[config["method"]["$ref"].rsplit("/", 1)[-1]]  # an enum, rendered as a dropdown
    assert method["enum"] == ["auto", "full", "lora", "qlora"]
    assert "fits memory" in config["method"]["description"]
    assert "description" in config["data"]
    assert set(definitions) >= {"LoraSettings", "TrainingSettings", "EvaluationSettings"}


def test_flow_rejects_bad_parameters_before_running():
    from flows.finetune import finetune

    with pytest.raises(Exception, match="method"):
        finetune.validate_parameters({"config": {"model": "m", "data": "d.jsonl", "method": "huge"}})


def test_data_checks_validate_every_setting_at_once(tmp_path):
    with pytest.raises(ValidationError) as caught:
        FinetuneConfig(model="m", data="d.jsonl", data_checks={"on_invalid": "drop", "max_quarantined_fraction": 2,
                                                               "min_rows": 0, "duplicate": "allow"})
    text = str(caught.value)
    for expected in ("on_invalid", "max_quarantined_fraction", "min_rows", "duplicate", "Extra inputs"):
        assert expected in text
    assert FinetuneConfig(model="m", data=str(tmp_path)).data == str(tmp_path)  # a folder of files
    assert FinetuneConfig(model="m", data="s3://bucket/datasets/support/").data_checks.on_invalid == "fail"
    assert FinetuneConfig(model="m", data="d.jsonl", data_format="text").data_format == "text"


def test_the_objective_its_settings_and_the_gpus_must_agree():
    FinetuneConfig(model="m", data="d.jsonl", objective="dpo", preference={"sft_weight": 0.5})  # DPO takes it
    with pytest.raises(ValidationError) as caught:
        FinetuneConfig(model="m", data="d.jsonl", objective="orpo", preference={"sft_weight": 0.5},
                       training={"num_gpus": 2})
    text = str(caught.value)
    assert "ORPO has that NLL already" in text and "set it to 0, or objective to 'dpo'" in text
    assert "trains in one process for now" in text  # both problems, in one error
    with pytest.raises(ValidationError, match="full_precision 'bf16' trains in one process for now"):
        FinetuneConfig(model="m", data="d.jsonl", training={"num_gpus": 2, "full_precision": "bf16"})
    FinetuneConfig(model="m", data="d.jsonl", training={"num_gpus": 2})  # auto: fp32 on several GPUs
    with pytest.raises(ValidationError, match="but objective is 'sft'"):
        FinetuneConfig(model="m", data="d.jsonl", preference={"sft_weight": 1.0})
