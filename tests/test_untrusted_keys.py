"""S3 keys, event payloads and manifest paths are data: none of them may write outside the folder
they are downloaded into, and none reaches a shell."""
import json
import subprocess

import pytest

from tasks.data.s3_events import skip_reason
from tasks.store.manifest import verify_files
from tasks.store.objects import UnsafeKeyError, key_problem, safe_local_path
from tasks.store.registry import fetch_run, run_uri
from tasks.store.transfer import download_folder

EVIL_KEYS = {  # the part after the downloaded prefix -> a word the refusal must contain
    "../../evil": "'..'",
    "ok/../../../evil": "'..'",
    "/abs": "absolute",
    "C:/windows": "absolute",
    "a\x07b": "control",
    "a\x00b": "control",
    "line\nbreak": "control",
    "a\\..\\..\\evil": "backslash",
    "x" * 256: "256-byte name",
    "/".join(["d" * 200] * 6): "bytes long",
}


@pytest.mark.parametrize("key", ["a.txt", "merged/model.safetensors", "a//b", "./a", "é/日本.jsonl", "x" * 255,
                                 "..hidden", "a..b"])
def test_ordinary_keys_are_accepted(key, tmp_path):
    assert key_problem(key) is None
    assert safe_local_path(tmp_path, key).resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("key, why", EVIL_KEYS.items(), ids=[repr(k)[:20] for k in EVIL_KEYS])
def test_unsafe_keys_are_refused_with_the_key_and_the_reason(key, why, tmp_path):
    with pytest.raises(UnsafeKeyError) as refused:
        safe_local_path(tmp_path, key, "s3://bucket/runs/x/")
    message = str(refused.value)
    assert why in message and repr(key)[:40] in message and "s3://bucket/runs/x/" in message


def test_a_symbolic_link_cannot_lead_out(tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafeKeyError, match="symbolic link"):
        safe_local_path(tmp_path / "dest", "link/evil")


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.integration
@pytest.mark.parametrize("relative", ["../../evil", "/abs", "a\x07b", "sub/..\\..\\evil"])
def test_downloading_a_prefix_with_an_unsafe_key_writes_nothing(relative, empty_bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=empty_bucket, Key="runs/x/manifest.json", Body=b'{"files": []}')
    client.put_object(Bucket=empty_bucket, Key="runs/x/good.txt", Body=b"fine")
    client.put_object(Bucket=empty_bucket, Key=f"runs/x/{relative}", Body=b"evil")
    area = tmp_path / "area"
    with pytest.raises(UnsafeKeyError, match="refusing to write"):
        download_folder(f"s3://{empty_bucket}/runs/x", area / "a" / "b" / "dest")
    assert files_under(tmp_path) == []  # checked before the first download: not even good.txt


@pytest.mark.integration
def test_a_published_manifest_cannot_name_a_path_outside_the_download(empty_bucket, tmp_path):
    import boto3

    manifest = {"files": [{"path": "../../outside.txt", "bytes": 4, "sha256": "0" * 64}]}
    boto3.client("s3").put_object(Bucket=empty_bucket, Key="models/runs/r1/manifest.json", Body=json.dumps(manifest))
    boto3.client("s3").put_object(Bucket=empty_bucket, Key="models/runs/outside.txt", Body=b"evil")
    with pytest.raises(UnsafeKeyError, match="manifest.json"):
        download_folder(f"s3://{empty_bucket}/models/runs/r1", tmp_path / "a" / "dest")
    assert files_under(tmp_path) == []


def test_a_local_published_manifest_cannot_copy_from_or_to_outside(tmp_path):
    run = tmp_path / "models" / "runs" / "r1"
    run.mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("not part of any run")
    (run / "manifest.json").write_text(json.dumps({"files": [{"path": "../../../secret.txt", "bytes": 1}]}))
    assert run_uri(str(tmp_path / "models"), "r1") == str(run)
    with pytest.raises(UnsafeKeyError, match="'..'"):
        fetch_run(str(tmp_path / "models"), "r1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert verify_files(run) == ["'../../../secret.txt': has a '..' segment (it would leave the destination folder)"]


@pytest.mark.parametrize("key", ["data/a\x07b.jsonl", "data/new\nline.jsonl", "data/" + "x" * 1100 + ".jsonl",
                                 "data/../other/x.jsonl"])
def test_the_event_bridge_ignores_unsafe_keys(key):
    assert "unsafe key" in skip_reason(key, "data/")


def test_nothing_runs_through_a_shell(tmp_path):
    from conftest import ROOT

    found = subprocess.run(["grep", "-rnE", r"shell\s*=\s*True|os\.system\(|os\.popen\(", "tasks", "flows",
                            "deployments", "infra"], cwd=ROOT, capture_output=True, text=True)
    assert found.stdout == ""
