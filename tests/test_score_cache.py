"""The base model's score is kept under the output and reused by a later run only when the base model's files,
the eval rows, the evaluation settings and the scoring code are all the same (tasks/store/score_cache.py);
the stages run on a real temporary Prefect server with the tiny model."""
import json
import shutil

import pytest
from prefect import flow

from conftest import DEMO_DATA, tiny_config
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.plan import plan_training
from tasks.runs import start_run
from tasks.store.score_cache import SCORE_CACHE, base_score_key, read_base_score, write_base_score

SETTINGS = {"evaluation": {"max_new_tokens": 12}, "device": "cpu"}


@flow
def score_base(config):
    run = start_run(config)
    data = ingest(config, run)
    return evaluate(config, data, plan_training(config, data), label="base")


@pytest.fixture
def scorings(monkeypatch) -> list[int]:
    """Counts the times a model is really scored (tasks.engine.eval_loop.evaluate_model runs)."""
    import tasks.engine.eval_loop as eval_loop

    calls, real = [], eval_loop.evaluate_model
    monkeypatch.setattr(eval_loop, "evaluate_model", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def stored_scores(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "out" / SCORE_CACHE / "base").glob("*.json"))


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_an_unchanged_base_and_eval_set_reuse_the_stored_score(tiny_model, tmp_path, scorings):
    config = tiny_config(tiny_model, tmp_path)
    first = score_base(config)
    assert first.from_cache is None and len(scorings) == 1 and len(stored_scores(tmp_path)) == 1

    again = score_base(config)
    assert len(scorings) == 1, "the base was scored again though nothing that decides its score changed"
    assert again.from_cache == str(tmp_path / "out" / SCORE_CACHE / "base" / stored_scores(tmp_path)[0])
    assert again.model_dump(exclude={"from_cache"}) == first.model_dump(exclude={"from_cache"})

    turned_off = score_base(config.model_copy(update={
        "evaluation": config.evaluation.model_copy(update={"reuse_base_score": False})}))
    assert len(scorings) == 2 and turned_off.from_cache is None


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_changed_eval_rows_or_settings_score_the_base_again(tiny_model, tmp_path, scorings):
    config = tiny_config(tiny_model, tmp_path)
    score_base(config)
    fewer_rows = tmp_path / "eval-fewer.jsonl"
    fewer_rows.write_text("".join((DEMO_DATA / "eval.jsonl").read_text().splitlines(keepends=True)[:-1]))
    changed_data = score_base(config.model_copy(update={"eval_data": str(fewer_rows)}))
    assert changed_data.from_cache is None and len(scorings) == 2

    longer_answers = config.evaluation.model_copy(update={"max_new_tokens": 13})
    changed_settings = score_base(config.model_copy(update={"evaluation": longer_answers}))
    assert changed_settings.from_cache is None and len(scorings) == 3
    assert len(stored_scores(tmp_path)) == 3


def test_the_key_follows_content_not_paths(tiny_model, tmp_path):
    eval_rows = tmp_path / "eval.jsonl"
    shutil.copy(DEMO_DATA / "eval.jsonl", eval_rows)
    key, identity = base_score_key(str(tiny_model), str(eval_rows), SETTINGS)
    copy = tmp_path / "copy-of-model"
    shutil.copytree(tiny_model, copy)
    assert base_score_key(str(copy), str(DEMO_DATA / "eval.jsonl"), SETTINGS)[0] == key  # same bytes elsewhere

    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    assert base_score_key(str(copy), str(eval_rows), SETTINGS)[0] != key  # one changed model file
    eval_rows.write_text(eval_rows.read_text() + eval_rows.read_text().splitlines(keepends=True)[0])
    assert base_score_key(str(tiny_model), str(eval_rows), SETTINGS)[0] != key  # one more eval row
    assert base_score_key(str(tiny_model), str(DEMO_DATA / "eval.jsonl"), SETTINGS | {"device": "cuda"})[0] != key
    assert identity["code"] and identity["libraries"]["torch"]
    with pytest.raises(NotADirectoryError):  # a name that is not a folder has no content to key on
        base_score_key("HuggingFaceTB/SmolLM2-135M-Instruct", str(eval_rows), SETTINGS)


def test_the_scoring_code_is_part_of_the_key(tiny_model, monkeypatch, tmp_path):
    import tasks.store.score_cache as score_cache

    key, _ = base_score_key(str(tiny_model), str(DEMO_DATA / "eval.jsonl"), SETTINGS)
    edited = tmp_path / "tasks"
    shutil.copytree(score_cache.TASKS, edited, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(score_cache, "TASKS", edited)
    assert base_score_key(str(tiny_model), str(DEMO_DATA / "eval.jsonl"), SETTINGS)[0] == key
    metrics = edited / "scoring" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n# a change to how scores are computed\n")
    assert base_score_key(str(tiny_model), str(DEMO_DATA / "eval.jsonl"), SETTINGS)[0] != key


def test_scores_are_stored_in_s3_and_a_misfiled_one_is_refused(bucket):
    output = f"s3://{bucket}/models"
    assert read_base_score(output, "abc") is None
    uri = write_base_score(output, "abc", {"model": "m"}, {"label": "base", "score": 0.5})
    assert uri == f"s3://{bucket}/models/{SCORE_CACHE}/base/abc.json"
    assert read_base_score(output, "abc")["result"] == {"label": "base", "score": 0.5}

    import boto3

    boto3.client("s3").copy_object(Bucket=bucket, Key=f"models/{SCORE_CACHE}/base/def.json",
                                   CopySource={"Bucket": bucket, "Key": f"models/{SCORE_CACHE}/base/abc.json"})
    with pytest.raises(ValueError, match="holds the score of key 'abc'"):
        read_base_score(output, "def")
