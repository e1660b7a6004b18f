"""`model: run:<id>` / `run:latest`: a run published in the output's registry as a run's base model
(tasks/store/base_run.py). Its merged model comes down into work_dir with every file checked against the
run's manifest, from a local output or from S3 (moto over HTTP); a run that does not exist, an output with
nothing promoted, and an adapter-only run are refused naming the run and the fix."""
import json
import shutil
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError

from tasks.config import FinetuneConfig
from tasks.planning.routing import read_model_shape
from tasks.store.base_run import BaseRunUnavailable, resolve_base_run
from tasks.store.manifest import file_entries, sha256_file
from tasks.store.objects import MANIFEST_NAME
from tasks.store.registry import promote, run_uri
from tasks.store.transfer import ChecksumMismatchError, upload_folder

BASE = {"path": "/models/tiny", "repo_id": None, "revision": None, "model_type": "llama"}


def publish(output: str, run_id: str, tiny_model: Path, scratch: Path, adapter_only: bool = False) -> dict:
    """A run folder as `package_run` lays it out (merged/ or adapter/, manifest.json listing every file),
    published with the project's own uploader."""
    staging = scratch / run_id
    if adapter_only:
        (staging / "adapter").mkdir(parents=True)
        (staging / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    else:
        shutil.copytree(tiny_model, staging / "merged")
    manifest = {"schema": 1, "run": {"run_id": run_id}, "base_model": BASE,
                "training": {"objective": "sft", "method": "full"}, "files": file_entries(staging)}
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest))
    upload_folder(staging, run_uri(output, run_id))
    return manifest


def test_a_local_run_resolves_to_its_merged_model_checked_and_recorded(tiny_model, tmp_path):
    output, work = str(tmp_path / "out"), str(tmp_path / "work")
    manifest = publish(output, "20261201-000000-sft", tiny_model, tmp_path / "staging")
    light = resolve_base_run("run:20261201-000000-sft", output, work, weights=False)
    folder = Path(light.path)
    assert folder == tmp_path / "work" / "base-runs" / "20261201-000000-sft" / "merged"
    assert (folder / "config.json").is_file() and not list(folder.glob("*.safetensors"))  # no weights yet
    model = resolve_base_run("run:20261201-000000-sft", output, work)
    weights = sorted(folder.glob("*.safetensors"))
    assert weights and all(sha256_file(w) == sha256_file(tiny_model / w.name) for w in weights)
    assert model.path == light.path and model.repo_id is None
    assert model.describe()["run"] == {
        "requested": "run:20261201-000000-sft", "output": output, "run_id": "20261201-000000-sft",
        "run_uri": f"{output}/runs/20261201-000000-sft", "promoted_at": None, "objective": "sft", "method": "full",
        "manifest_sha256": sha256_file(tmp_path / "out" / "runs" / "20261201-000000-sft" / MANIFEST_NAME),
        "base_model": BASE}
    assert manifest["files"]  # a second call finds the download complete and leaves it as it is
    stamp = weights[0].stat().st_mtime_ns
    resolve_base_run("run:20261201-000000-sft", output, work)
    assert weights[0].stat().st_mtime_ns == stamp


def test_a_missing_run_and_an_output_with_nothing_promoted_are_named_with_the_fix(tiny_model, tmp_path):
    output, work = str(tmp_path / "out"), str(tmp_path / "work")
    with pytest.raises(BaseRunUnavailable, match="run:latest") as error:
        resolve_base_run("run:latest", output, work)
    assert "no run of output" in str(error.value) and "prefect-finetune promote" in str(error.value)
    publish(output, "20261201-000000-sft", tiny_model, tmp_path / "staging")
    with pytest.raises(BaseRunUnavailable) as error:
        resolve_base_run("run:20261201-999999-typo", output, work)
    message = str(error.value)
    assert "model='run:20261201-999999-typo': no run '20261201-999999-typo' is published in output=" in message
    assert f"give the id of a folder under {output}/runs/" in message and "run:latest" in message
    assert not (tmp_path / "work" / "base-runs" / "20261201-999999-typo").exists()


def test_an_adapter_only_run_cannot_be_a_base(tiny_model, tmp_path):
    output = str(tmp_path / "out")
    publish(output, "20261201-000000-adapter", tiny_model, tmp_path / "staging", adapter_only=True)
    with pytest.raises(BaseRunUnavailable) as error:
        resolve_base_run("run:20261201-000000-adapter", output, str(tmp_path / "work"))
    message = str(error.value)
    assert "run 20261201-000000-adapter" in message and "has no merged model" in message
    assert "published its adapter only (publish.adapter_only)" in message
    assert "publish.adapter_only: false" in message and "/models/tiny" in message


def test_run_latest_from_s3_is_the_promoted_run_every_file_checked(tiny_model, tmp_path, empty_bucket):
    output = f"s3://{empty_bucket}/registry"
    publish(output, "20261201-000000-a", tiny_model, tmp_path / "staging")
    publish(output, "20261201-000001-b", tiny_model, tmp_path / "staging")
    promote(output, "20261201-000001-b", {"promote": True})
    assert read_model_shape("run:latest", output=output).model_type == "llama"  # routing reads it in place
    model = resolve_base_run("run:latest", output, str(tmp_path / "work"))
    assert model.base_run["run_id"] == "20261201-000001-b" and model.base_run["promoted_at"]
    assert Path(model.path) == tmp_path / "work" / "base-runs" / "20261201-000001-b" / "merged"
    assert sorted(p.name for p in Path(model.path).iterdir()) == sorted(p.name for p in tiny_model.iterdir())

    weights = next(p.name for p in tiny_model.glob("*.safetensors"))
    s3 = boto3.client("s3")  # bytes changed in the bucket behind the manifest's back
    s3.put_object(Bucket=empty_bucket, Key=f"registry/runs/20261201-000000-a/merged/{weights}", Body=b"not weights")
    with pytest.raises(ChecksumMismatchError, match=f"merged/{weights}: sha256 differs from the manifest"):
        resolve_base_run("run:20261201-000000-a", output, str(tmp_path / "work"))
    assert not (tmp_path / "work" / "base-runs" / "20261201-000000-a" / MANIFEST_NAME).exists()  # never complete


def test_run_latest_stays_the_run_a_flow_run_first_saw(tiny_model, tmp_path):
    """The flow resolves the base twice (tokenizer, then weights once the data is good): a promotion in
    between must not give it another run's weights than the tokenizer it checked the data with."""
    output = str(tmp_path / "out")
    for run_id in ("20261201-000000-a", "20261201-000001-b"):
        publish(output, run_id, tiny_model, tmp_path / "staging")
    promote(output, "20261201-000000-a", {"promote": True})
    first = resolve_base_run("run:latest", output, str(tmp_path / "work"), weights=False)
    promote(output, "20261201-000001-b", {"promote": True})
    second = resolve_base_run("run:latest", output, str(tmp_path / "work"), pinned_run=first.run_id)
    assert first.run_id == second.run_id == "20261201-000000-a"
    assert resolve_base_run("run:latest", output, str(tmp_path / "work2"), weights=False).run_id == "20261201-000001-b"


def test_the_config_checks_the_spelling_of_a_run(tmp_path):
    data = str(tmp_path / "rows.jsonl")
    assert FinetuneConfig(model="run:latest", data=data).model == "run:latest"
    for model, revision, expected in [("run:", None, "names no run: give run:<run-id>"),
                                      ("run:a/b", None, "a run id is one folder name under <output>/runs/"),
                                      ("run:x", "main", "model_revision='main' is for a Hugging Face Hub id")]:
        with pytest.raises(ValidationError, match=expected):
            FinetuneConfig(model=model, model_revision=revision, data=data)
