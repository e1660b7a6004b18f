"""The whole flow against a real temporary Prefect server, on a tiny model built from a config."""
import json
import time
from importlib import metadata

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_DATA, tiny_config
from flows.finetune import finetune
from tasks.store.manifest import sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def task_names(state, last: str) -> list[str]:
    """The flow run's task runs by name, once `last` (the task it stopped in) is among them: the server
    records task runs from events the run sent in the background, so they can land after it returned."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        names = sorted(run.name.rsplit("-", 1)[0] if not run.name.startswith("evaluate-") else run.name for run in runs)
        if last in names or time.monotonic() > deadline:
            return names
        time.sleep(0.5)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_each_method_fine_tunes_and_publishes(tiny_model, tmp_path, method):
    base_sha = sha256_file(tiny_model / "model.safetensors")
    dtype = "bfloat16" if method == "qlora" else "float32"
    result = finetune(tiny_config(tiny_model, tmp_path, method=method, publish={"dtype": dtype}))
    run_dir = tmp_path / "out" / "runs" / result.run_id
    assert result.output_uri == str(run_dir) and result.method == method
    manifest = json.loads((run_dir / "manifest.json").read_text())

    # Every file is listed with its checksum, and nothing half-written is left beside the run.
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    assert all(sha256_file(run_dir / path) == digest for path, digest in listed.items())
    assert [p.name for p in (tmp_path / "out" / "runs").iterdir()] == [result.run_id]
    assert manifest["training"]["resumed_from_step"] == 0
    assert ("adapter/adapter_model.safetensors" in listed) == (method != "full")
    assert {"merged/model.safetensors", "merged/config.json", "merged/tokenizer.json", "merged/README.md",
            "merged/generation_config.json"} <= set(listed)
    assert f"run `{result.run_id}`" in (run_dir / "merged" / "README.md").read_text()  # the model card

    # The gate (tuned >= base + 0.0) decides whether latest.json points at the run.
    assert result.promoted == (result.tuned_score >= result.base_score) == manifest["promotion"]["promote"]
    latest = tmp_path / "out" / "latest.json"
    assert latest.is_file() == result.promoted
    if result.promoted:
        assert json.loads(latest.read_text())["run_id"] == result.run_id

    # The manifest says what was trained, from what, how, and how well.
    assert manifest["run"]["run_id"] == result.run_id and manifest["run"]["flow_run_id"]
    assert manifest["base_model"]["path"] == str(tiny_model)
    assert manifest["data"]["sources"][0]["sha256"] == sha256_file(DEMO_DATA / "train.jsonl")
    assert manifest["plan"]["method"] == method and manifest["plan"]["estimate"]["total"] > 0
    assert manifest["training"]["peak_memory_bytes"] > 0
    assert manifest["libraries"]["torch"] == metadata.version("torch")
    assert manifest["memory"]["measured_bytes"] == manifest["training"]["peak_memory_bytes"]
    assert manifest["memory"]["estimated_bytes"] == manifest["plan"]["estimate"]["total"]
    assert manifest["hardware"]["device"] == "cpu" and manifest["base_model"]["revision"] is None
    assert manifest["export"]["merge_max_abs_logit_diff"] < 1e-3

    # It learned, and the base model on disk is untouched while the merged one differs from it.
    assert result.tuned_eval_loss < result.base_eval_loss
    assert sha256_file(tiny_model / "model.safetensors") == base_sha
    base = load_file(tiny_model / "model.safetensors")
    merged = load_file(run_dir / "merged" / "model.safetensors")
    assert {str(t.dtype) for t in merged.values()} == {f"torch.{dtype}"}
    assert manifest["export"]["saved_dtype"] == dtype and manifest["export"]["saved_top1_agreement"] >= 0.9
    changed = [k for k in base if not torch.equal(base[k].to(merged[k].dtype), merged[k])]
    assert any("mlp" in k for k in changed)
    if method == "full":
        assert "model.embed_tokens.weight" in changed
    else:  # LoRA touches only the linear layers
        assert "model.embed_tokens.weight" not in changed


def score_as_a_user_loads_it(folder, config, eval_path) -> dict:
    """The merged folder loaded as its consumers load it (plain transformers: the saved dtype, no 4-bit),
    scored by the evaluation code on the run's eval split."""
    from transformers import AutoModelForCausalLM

    from tasks.data.tokenization import encoded_split, load_tokenizer
    from tasks.engine.eval_loop import evaluate_model

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(str(folder))
    conversations, examples = encoded_split(config, eval_path, tokenizer=tokenizer)
    return evaluate_model(model, tokenizer, conversations, examples, config.evaluation, "cpu") | {"dtype": model.dtype}


def test_a_qlora_run_is_scored_as_it_is_published(tiny_model, tmp_path):
    # QLoRA trains on a 4-bit base but publishes a merge into the full-precision base: the gate must score
    # the published weights (merged, in the published dtype), not the 4-bit base + adapter it trained.
    config = tiny_config(tiny_model, tmp_path, method="qlora", publish={"dtype": "bfloat16"})
    result = finetune(config)
    run_dir = tmp_path / "out" / "runs" / result.run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    [eval_path] = (tmp_path / "work").glob(f"{result.run_id}/data/eval.jsonl")
    published = score_as_a_user_loads_it(run_dir / "merged", config, eval_path)
    assert published["dtype"] == torch.bfloat16
    assert result.tuned_eval_loss == pytest.approx(published["loss"], abs=1e-6)
    assert result.scores["tuned"] == pytest.approx(published["scores"], abs=1e-9)
    assert manifest["evaluation"]["tuned"]["answers"] == published["answers"]
    assert manifest["evaluation"]["tuned"]["scored_as"] == {"weights": "merged", "dtype": "bfloat16"}
    # The base is scored in the same precision (its own weights in the published dtype, not 4-bit).
    assert manifest["evaluation"]["base"]["scored_as"] == {"weights": "base", "dtype": "bfloat16"}
    assert "the tuned row is `merged` in bfloat16" in (run_dir / "merged" / "README.md").read_text()


def test_adapter_only_run_that_fails_the_gate_is_published_but_not_promoted(tiny_model, tmp_path):
    result = finetune(tiny_config(tiny_model, tmp_path, method="lora",
                                  publish={"adapter_only": True, "min_improvement": 2.0}))  # scores are <= 1
    run_dir = tmp_path / "out" / "runs" / result.run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert not result.promoted and not (tmp_path / "out" / "latest.json").exists()
    assert manifest["promotion"]["promote"] is False and "keep the current latest" in manifest["promotion"]["reason"]
    assert {"adapter/adapter_model.safetensors", "adapter/README.md"} <= listed
    assert not any(path.startswith("merged/") for path in listed) and manifest["export"] == {"adapter_only": True}
    assert "model.load_adapter" in (run_dir / "adapter" / "README.md").read_text()


def test_summary_artifact_is_written(tiny_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result = finetune(tiny_config(tiny_model, tmp_path, method="lora"))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-summary"])))
    latest = max(artifacts, key=lambda a: a.created)
    assert result.run_id in latest.data and "| base |" in latest.data and "| tuned |" in latest.data
    assert "`loss_curve.png`" in latest.data and "## Promotion gate" in latest.data
    assert "| estimate |" in latest.data and "| formula |" in latest.data  # how the plan's estimate was made


def latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(artifacts, key=lambda a: a.created)


def test_a_second_run_is_compared_with_the_published_model_on_the_same_rows(tiny_model, tmp_path):
    evaluation = {"max_new_tokens": 12, "max_generation_rows": 4, "metric": "chrf", "metrics": ["exact_match"]}
    publish = {"min_improvement": -1.0, "max_regression": 0.0}  # nothing to beat on the base: the published model
    first = finetune(tiny_config(tiny_model, tmp_path, method="lora", evaluation=evaluation, publish=publish))
    assert first.promoted and first.published_score is None  # nothing was published before it
    # The same settings train the same model: it must score exactly what the published copy scores.
    second = finetune(tiny_config(tiny_model, tmp_path, method="lora", evaluation=evaluation, publish=publish))
    assert set(second.scores) == {"base", "tuned", "published"}
    assert set(second.scores["tuned"]) == {"exact_match", "chrf"} and second.metric == "chrf"
    assert second.published_score == pytest.approx(second.tuned_score, abs=1e-6)
    assert second.promoted and "published" in second.gate
    manifest = json.loads((tmp_path / "out" / "runs" / second.run_id / "manifest.json").read_text())
    assert manifest["evaluation"]["published"]["run_id"] == first.run_id
    assert manifest["evaluation"]["published"]["eval_rows"] == manifest["evaluation"]["tuned"]["eval_rows"]
    assert [c["name"] for c in manifest["promotion"]["details"]["checks"]] == [
        "score>=base+min_improvement", "score>=published-max_regression"]
    assert "loss_curve.png" in {f["path"] for f in manifest["files"]}

    table = json.loads(latest_artifact("finetune-metrics").data)
    assert [row["model"] for row in table] == ["base", "tuned", f"published ({first.run_id})"]
    assert set(table[0]) == {"model", "eval_loss", "perplexity", "exact_match", "chrf"}
    assert "| published |" in latest_artifact("finetune-summary").data


@pytest.mark.parametrize("name,content,expected", [
    ("missing.jsonl", None, "missing.jsonl: file not found"),
    ("columns.jsonl", '{"question": "q", "answer": "a"}\n', "cannot tell the row format from the columns (question, answer)"),
    ("empty.jsonl", "", "empty.jsonl: the dataset has no rows"),
    ("blank.jsonl", '{"prompt": "q", "completion": " "}\n', "blank.jsonl line 1: got ' '"),
])
def test_bad_data_fails_in_ingest_before_any_model_is_loaded(tiny_model, tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_text(content)
    state = finetune(tiny_config(tiny_model, tmp_path, data=str(tmp_path / name), eval_data=None), return_state=True)
    assert state.is_failed()
    assert expected in str(state.result(raise_on_failure=False))
    names = task_names(state, last="ingest")
    assert "ingest" in names and set(names) <= {"check-data-version", "fetch-model", "ingest", "validate"}
    assert names.count("fetch-model") == 1  # the tokenizer's fetch ran; the weights' never did
    assert not (tmp_path / "out").exists()


def test_forced_method_that_does_not_fit_fails_in_plan(tiny_model, tmp_path):
    state = finetune(tiny_config(tiny_model, tmp_path, method="full", memory_budget_gib=0.5), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "method 'full' needs at least" in message and "budget is 0.50 GiB (memory_budget_gib)" in message
    assert [name for name in task_names(state, last="plan") if name not in ("validate", "check-data-version")] == [
        "fetch-model", "fetch-model", "ingest", "plan"]  # the model's tokenizer, then (after ingest) its weights


def test_a_model_folder_with_only_pickle_weights_is_refused_before_training(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickle-model"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_model / "model.safetensors"), folder / "pytorch_model.bin")
    state = finetune(tiny_config(folder, tmp_path), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "pytorch_model.bin" in message and "model_loading.allow_pickle_weights" in message
    names = task_names(state, last="plan")
    assert "plan" in names and "train" not in names and not any(n.startswith("evaluate") for n in names)


def test_a_new_run_with_resume_continues_from_the_last_checkpoint(tiny_model, tmp_path):
    training = {"learning_rate": 3e-3, "lr_schedule": "constant", "batch_size": 8, "max_seq_len": 128,
                "eval_every": 2, "early_stopping_patience": 0, "checkpoint_every": 2}
    first = finetune(tiny_config(tiny_model, tmp_path, method="lora", training={**training, "max_steps": 4}))
    checkpoints = tmp_path / "out" / "checkpoints"
    (run_key,) = [p.name for p in checkpoints.iterdir()]
    assert sorted(p.name for p in (checkpoints / run_key).iterdir()) == ["step-0000002", "step-0000004"]

    second = finetune(tiny_config(tiny_model, tmp_path, method="lora", resume=True,
                                  training={**training, "max_steps": 6}))
    manifest = json.loads((tmp_path / "out" / "runs" / second.run_id / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == 4
    assert manifest["training"]["resumed_from"] == str(checkpoints / run_key / "step-0000004")
    assert [r["step"] for r in manifest["training"]["history"]] == [1, 2, 3, 4, 5, 6]
    assert first.run_id != second.run_id

    # Other settings train something else: resume finds nothing to continue and starts afresh.
    third = finetune(tiny_config(tiny_model, tmp_path, method="lora", resume=True,
                                 training={**training, "max_steps": 2, "learning_rate": 1e-3}))
    manifest = json.loads((tmp_path / "out" / "runs" / third.run_id / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == 0 and manifest["training"]["resumed_from"] is None


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_one_before(tiny_model, tmp_path):
    training = {"learning_rate": 3e-3, "lr_schedule": "constant", "batch_size": 8, "max_seq_len": 128,
                "eval_every": 2, "early_stopping_patience": 0, "checkpoint_every": 2, "max_steps": 4}
    finetune(tiny_config(tiny_model, tmp_path, method="lora", training=training))
    (newest,) = (tmp_path / "out" / "checkpoints").glob("*/step-0000004")
    with open(newest / "optimizer.pt", "r+b") as handle:  # one flipped byte, as a bad disk or copy gives
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))

    resumed = finetune(tiny_config(tiny_model, tmp_path, method="lora", resume=True,
                                   training={**training, "max_steps": 6}))
    manifest = json.loads((tmp_path / "out" / "runs" / resumed.run_id / "manifest.json").read_text())
    assert manifest["training"]["resumed_from"] == str(newest.with_name("step-0000002"))
    assert [r["step"] for r in manifest["training"]["history"]] == [1, 2, 3, 4, 5, 6]


def test_plain_text_data_is_evaluated_on_continuations(tiny_model, tmp_path):
    for name in ("train", "eval"):  # the demo rows as plain text: question and answer in one string
        rows = [json.loads(line) for line in (DEMO_DATA / f"{name}.jsonl").read_text().splitlines()]
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(m["content"] for m in row["messages"])}) + "\n" for row in rows))
    config = tiny_config(tiny_model, tmp_path, data=str(tmp_path / "train.jsonl"), method="lora",
                         eval_data=str(tmp_path / "eval.jsonl"), evaluation={"metric": "chrf", "max_new_tokens": 8,
                                                                            "max_generation_rows": 2})
    result = finetune(config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 4})}))
    report = json.loads((tmp_path / "out" / "runs" / result.run_id / "manifest.json").read_text())
    assert report["data"]["sources"][0]["data_format"] == "text"
    assert result.tuned_eval_loss < result.base_eval_loss and 0 <= result.tuned_score <= 1


def test_quarantined_rows_are_published_next_to_the_model(tiny_model, tmp_path):
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                     {"role": "assistant", "content": f"Answer {i}." if i != 5 else " "}]})
            for i in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    result = finetune(tiny_config(tiny_model, tmp_path, method="lora", data=str(tmp_path / "train.jsonl"),
                                  data_checks={"on_invalid": "quarantine"}))
    run_dir = tmp_path / "out" / "runs" / result.run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    published = [p for p in manifest["files"] if p["path"].startswith("quarantine/")]
    assert len(published) == 1
    (record,) = [json.loads(line) for line in open(run_dir / published[0]["path"])]
    assert record["line"] == 6 and record["reasons"] == ["not_blank messages: message 1 (assistant) has empty content"]


def test_a_run_on_a_list_of_sources_records_the_mix_in_the_manifest(tiny_model, tmp_path):
    extra = tmp_path / "extra.jsonl"  # a second source, in another row format than the demo's chat rows
    extra.write_text("".join(json.dumps({"prompt": f"Extra question {i}?", "completion": f"Extra answer {i}."}) + "\n"
                             for i in range(30)))
    train = str(DEMO_DATA / "train.jsonl")
    config = tiny_config(tiny_model, tmp_path, method="lora", eval_data=None,
                         data=[{"path": train, "weight": 1}, {"path": str(extra), "max_rows": 12}])
    result = finetune(config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 2})}))
    manifest = json.loads((tmp_path / "out" / "runs" / result.run_id / "manifest.json").read_text())
    demo_rows = sum(1 for line in open(train) if line.strip())
    mixed = manifest["data"]["mix"]
    assert mixed["seed"] == config.training.seed and mixed["rows"] == demo_rows + 12
    assert [(s["path"], s["weight"], s["max_rows"], s["rows_taken"]) for s in mixed["sources"]] == [
        (train, 1.0, None, demo_rows), (str(extra), None, 12, 12)]
    assert [(s["uri"], s["read"], s["quarantined"]) for s in manifest["data"]["sources"]] == [
        (train, demo_rows, 0), (str(extra), 30, 0)]
    assert manifest["data"]["train_rows"] + manifest["data"]["eval_rows"] == demo_rows + 12
    assert "of the mix" in manifest["data"]["eval_origin"]
    assert manifest["config"]["data"][1] == {"path": str(extra), "weight": None, "max_rows": 12, "config": None,
                                             "split": None, "revision": None}
