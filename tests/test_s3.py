"""Data from and models to S3, over real HTTP to moto's server on 127.0.0.1."""
import json

import boto3
import pytest

from conftest import DEMO_DATA, tiny_config
from flows.finetune import finetune
from tasks.store.manifest import verify_files
from tasks.store.transfer import download_folder

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def test_s3_in_s3_out(tiny_model, bucket, tmp_path):
    s3 = boto3.client("s3")
    s3.upload_file(str(DEMO_DATA / "train.jsonl"), bucket, "datasets/q7/train.jsonl")
    s3.upload_file(str(DEMO_DATA / "eval.jsonl"), bucket, "datasets/q7/eval.jsonl")
    config = tiny_config(tiny_model, tmp_path, method="lora", data=f"s3://{bucket}/datasets/q7/train.jsonl",
                         eval_data=f"s3://{bucket}/datasets/q7/eval.jsonl", output=f"s3://{bucket}/models/q7",
                         publish={"min_improvement": -1.0})  # scores are in [0, 1]: the gate always promotes
    result = finetune(config)
    assert result.output_uri == f"s3://{bucket}/models/q7/runs/{result.run_id}"

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="models/q7/")["Contents"]]
    assert f"models/q7/runs/{result.run_id}/manifest.json" in keys
    assert f"models/q7/runs/{result.run_id}/merged/model.safetensors" in keys
    card = s3.head_object(Bucket=bucket, Key=f"models/q7/runs/{result.run_id}/merged/README.md")
    assert card["ContentType"].startswith("text/markdown")
    assert not (tmp_path / "work" / result.run_id / "publish").exists()  # staging cleaned after upload

    local = tmp_path / "download"
    download_folder(result.output_uri, local)  # checks every sha256 against the manifest
    assert verify_files(local) == []
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["data"]["sources"][0]["uri"] == f"s3://{bucket}/datasets/q7/train.jsonl"
    etag = s3.head_object(Bucket=bucket, Key="datasets/q7/train.jsonl")["ETag"].strip('"')
    assert manifest["data"]["sources"][0]["etag"] == etag
    assert result.promoted
    latest = json.loads(s3.get_object(Bucket=bucket, Key="models/q7/latest.json")["Body"].read())
    assert latest["run_id"] == result.run_id

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local / "merged")
    assert model.config.vocab_size > 0


def test_missing_s3_object_fails_in_ingest(tiny_model, bucket, tmp_path):
    config = tiny_config(tiny_model, tmp_path, data=f"s3://{bucket}/nothing/here.jsonl", eval_data=None)
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nothing/here.jsonl: NoSuchKey"):
        finetune(config)

