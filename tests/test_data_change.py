"""Has the data changed since the newest published run? Has an event's object been overwritten? (pure)"""
import json
import shutil

import pytest

from conftest import DEMO_DATA
from tasks.config import FinetuneConfig
from tasks.data.freshness import etag_mismatch, newest_published_manifest, unchanged_since_published
from tasks.store.manifest import sha256_file


def publish_fake_run(output, run_id: str, sources: dict[str, str], manifest: bool = True,
                     config: dict | None = None) -> None:
    """A run folder as publish leaves it: only what the check reads (the manifest's data sources, config)."""
    folder = output / "runs" / run_id
    folder.mkdir(parents=True)
    if manifest:
        (folder / "manifest.json").write_text(json.dumps(
            {"created_at": "2026-11-29T00:00:00+00:00", "config": config or {},
             "data": {"sources": [{"uri": uri, "sha256": sha} for uri, sha in sources.items()]}}))


def config_for(tmp_path, data, eval_data=None, **extra) -> FinetuneConfig:
    return FinetuneConfig(model="m", data=str(data), eval_data=str(eval_data) if eval_data else None,
                          output=str(tmp_path / "out"), **extra)


def test_retraining_is_skipped_only_when_the_newest_run_used_the_same_data(tmp_path):
    data, eval_data = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    shutil.copy(DEMO_DATA / "train.jsonl", data)
    shutil.copy(DEMO_DATA / "eval.jsonl", eval_data)
    config = config_for(tmp_path, data, eval_data)
    assert unchanged_since_published(config) is None  # nothing published yet

    out = tmp_path / "out"
    publish_fake_run(out, "20261128-010000-aaaa", {str(data): "0" * 64, str(eval_data): sha256_file(eval_data)})
    assert unchanged_since_published(config) is None  # the published run trained on other data
    publish_fake_run(out, "20261128-020000-bbbb", {str(data): sha256_file(data), str(eval_data): sha256_file(eval_data)})
    publish_fake_run(out, "20261128-030000-cccc", {}, manifest=False)  # newer, but its publish never finished
    reason = unchanged_since_published(config)
    assert "20261128-020000-bbbb" in reason and "not retraining" in reason
    assert newest_published_manifest(str(out))[0] == "20261128-020000-bbbb"

    with data.open("a") as f:  # one more row
        f.write(json.dumps({"messages": [{"role": "user", "content": "new?"}, {"role": "assistant", "content": "yes"}]}) + "\n")
    assert unchanged_since_published(config) is None
    # A source the published run did not train on at all is a change too.
    other = tmp_path / "other.jsonl"
    shutil.copy(DEMO_DATA / "train.jsonl", other)
    assert unchanged_since_published(config_for(tmp_path, other, eval_data)) is None


def test_the_same_rows_under_another_objective_or_its_settings_retrain(tmp_path):
    """Nightly DPO on unchanged pairs skips; switching it to orpo, or another beta, trains."""
    data = tmp_path / "pairs.jsonl"
    shutil.copy(DEMO_DATA / "train.jsonl", data)  # the check reads bytes only
    dpo = config_for(tmp_path, data, objective="dpo", preference={"beta": 0.1})
    publish_fake_run(tmp_path / "out", "20261128-010000-aaaa", {str(data): sha256_file(data)},
                     config=dpo.model_dump(mode="json"))
    assert "not retraining" in unchanged_since_published(dpo)
    assert unchanged_since_published(config_for(tmp_path, data, objective="dpo", preference={"beta": 0.3})) is None
    assert unchanged_since_published(config_for(tmp_path, data, objective="orpo", preference={"beta": 0.1})) is None
    assert unchanged_since_published(config_for(tmp_path, data)) is None  # sft
    older = {**dpo.model_dump(mode="json"), "preference": {"beta": 0.1}}  # a manifest from before a setting existed
    publish_fake_run(tmp_path / "out", "20261128-020000-bbbb", {str(data): sha256_file(data)}, config=older)
    assert "not retraining" in unchanged_since_published(dpo)  # its missing settings read as their defaults


def test_published_runs_are_found_in_s3(empty_bucket, tmp_path):
    bucket = empty_bucket  # other tests publish runs to the shared moto state
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="data/train.jsonl", Body=(DEMO_DATA / "train.jsonl").read_bytes())
    sources = [{"uri": f"s3://{bucket}/data/train.jsonl", "sha256": sha256_file(DEMO_DATA / "train.jsonl")}]
    s3.put_object(Bucket=bucket, Key="models/runs/20261128-010000-aaaa/manifest.json",
                  Body=json.dumps({"data": {"sources": sources}}))
    s3.put_object(Bucket=bucket, Key="models/runs/20261128-020000-bbbb/adapter/x.bin", Body=b"half a publish")
    config = FinetuneConfig(model="m", data=f"s3://{bucket}/data/train.jsonl", output=f"s3://{bucket}/models")
    assert "20261128-010000-aaaa" in unchanged_since_published(config)
    s3.put_object(Bucket=bucket, Key="data/train.jsonl", Body=(DEMO_DATA / "eval.jsonl").read_bytes())
    assert unchanged_since_published(config) is None


def test_an_unreadable_manifest_is_an_error_not_a_missing_run(empty_bucket, proxy):
    """Only S3's not-found code skips a run; access denied must not make an older run look newest."""
    import boto3
    from botocore.exceptions import ClientError

    for run_id in ("20261128-010000-aaaa", "20261128-020000-bbbb"):
        boto3.client("s3").put_object(Bucket=empty_bucket, Key=f"models/runs/{run_id}/manifest.json",
                                      Body=json.dumps({"run": run_id}))
    assert newest_published_manifest(f"s3://{empty_bucket}/models")[0] == "20261128-020000-bbbb"
    proxy.inject("GET", "20261128-020000-bbbb/manifest.json", 403)
    with pytest.raises(ClientError) as denied:
        newest_published_manifest(f"s3://{empty_bucket}/models")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_an_overwritten_event_object_is_refused(bucket):
    import boto3

    etag = boto3.client("s3").put_object(Bucket=bucket, Key="in/a.jsonl", Body=b"one")["ETag"].strip('"')
    config = FinetuneConfig(model="m", data=f"s3://{bucket}/in/a.jsonl", data_etag=etag)
    assert etag_mismatch(config) is None
    assert etag_mismatch(config.model_copy(update={"data_etag": None})) is None
    boto3.client("s3").put_object(Bucket=bucket, Key="in/a.jsonl", Body=b"two")
    reason = etag_mismatch(config)
    assert f"started for ETag {etag}" in reason and "overwritten" in reason


def test_data_etag_needs_an_s3_object():
    with pytest.raises(ValueError, match="data_etag is set but data='local.jsonl' is not an s3:// object"):
        FinetuneConfig(model="m", data="local.jsonl", data_etag="abc")


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_a_run_for_an_overwritten_object_stops_before_it_starts(tiny_model, bucket, tmp_path):
    import boto3

    from conftest import tiny_config
    from flows.finetune import finetune

    s3 = boto3.client("s3")
    etag = s3.put_object(Bucket=bucket, Key="in/a.jsonl", Body=(DEMO_DATA / "train.jsonl").read_bytes())["ETag"]
    s3.put_object(Bucket=bucket, Key="in/a.jsonl", Body=(DEMO_DATA / "eval.jsonl").read_bytes())  # a newer upload
    config = tiny_config(tiny_model, tmp_path, data=f"s3://{bucket}/in/a.jsonl", eval_data=None,
                         data_etag=etag.strip('"'))
    state = finetune(config, return_state=True)
    assert state.is_failed() and "overwritten after the event" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "work").exists()  # nothing started: no run folder, no model loaded


def test_a_mix_is_unchanged_only_with_the_same_sources_weights_and_seed(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    shutil.copy(DEMO_DATA / "train.jsonl", a)
    shutil.copy(DEMO_DATA / "eval.jsonl", b)
    data = [{"path": str(a), "weight": 2.0}, {"path": str(b), "max_rows": 5}]
    config = FinetuneConfig(model="m", data=data, output=str(tmp_path / "out"))
    folder = tmp_path / "out" / "runs" / "20261128-010000-aaaa"
    folder.mkdir(parents=True)
    mix = {"seed": config.training.seed, "sources": [{"path": str(a), "weight": 2.0, "max_rows": None},
                                                     {"path": str(b), "weight": None, "max_rows": 5}]}
    (folder / "manifest.json").write_text(json.dumps({"data": {"mix": mix, "sources": [
        {"uri": str(a), "sha256": sha256_file(a)}, {"uri": str(b), "sha256": sha256_file(b)}]}}))
    assert "20261128-010000-aaaa" in unchanged_since_published(config)
    reweighted = FinetuneConfig(model="m", data=[{**data[0], "weight": 1.0}, data[1]], output=str(tmp_path / "out"))
    assert unchanged_since_published(reweighted) is None  # other weights: other training rows
    reseeded = config.model_copy(update={"training": config.training.model_copy(update={"seed": 1234})})
    assert unchanged_since_published(reseeded) is None
    b.write_text(b.read_text() + b.read_text().splitlines()[0] + "\n")
    assert unchanged_since_published(config) is None  # one source's bytes changed
