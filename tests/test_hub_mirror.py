"""`hub.mirror`: an S3 prefix as the fleet's copy of the Hub cache, against moto's S3 server over HTTP and offline
Hub caches laid out as huggingface_hub lays them out (tests/hub_cache.py). Worker A's cache holds the model (as
if A had downloaded it from the Hub); worker B's cache is empty, with the Hub out of reach (HF_HUB_OFFLINE=1)."""
import json

import boto3
import pytest
from pydantic import ValidationError

from conftest import tiny_config
from hub_cache import COMMIT, add_to_hub_cache, offline_hub_cache
from tasks.store.hub import HubModelUnavailable, resolve_model
from tasks.store.transfer import ChecksumMismatchError

REPO = "tiny-org/tiny-chat"
NEWER = "fedcba9876543210fedcba9876543210fedcba98"
SNAPSHOTS = "hub-mirror/models--tiny-org--tiny-chat/snapshots"


@pytest.fixture
def fleet(tmp_path, monkeypatch, tiny_model, empty_bucket):
    """(worker A's cache, holding the model at COMMIT; worker B's empty cache; the mirror URI)."""
    cache_a = offline_hub_cache(tmp_path / "worker-a", monkeypatch)
    add_to_hub_cache(cache_a, REPO, tiny_model)
    return cache_a, tmp_path / "worker-b", f"s3://{empty_bucket}/hub-mirror/"


def mirror_keys(bucket: str) -> list[str]:
    return sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", []))


def files_of(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_worker_a_publishes_and_worker_b_gets_the_same_commit_and_files_from_the_mirror(fleet, empty_bucket):
    from huggingface_hub import try_to_load_from_cache

    cache_a, cache_b, mirror = fleet
    a = resolve_model(REPO, mirror=mirror)
    assert a.mirror is None and a.published == f"{mirror}models--tiny-org--tiny-chat/snapshots/{COMMIT}"
    keys = mirror_keys(empty_bucket)
    assert f"{SNAPSHOTS}/{COMMIT}/manifest.json" in keys and "hub-mirror/models--tiny-org--tiny-chat/refs/main" in keys
    assert f"{SNAPSHOTS}/{COMMIT}/model.safetensors" in keys

    b = resolve_model(REPO, cache_dir=str(cache_b), mirror=mirror)
    assert b.commit == COMMIT and b.mirror == a.published and b.path == str(
        cache_b / "models--tiny-org--tiny-chat" / "snapshots" / COMMIT)
    assert files_of(cache_b / "models--tiny-org--tiny-chat" / "snapshots" / COMMIT) == files_of(
        cache_a / "models--tiny-org--tiny-chat" / "snapshots" / COMMIT)
    # laid out as huggingface_hub lays it out: its own offline lookup of the branch finds B's copy
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=cache_b) == f"{b.path}/config.json"
    record = b.describe()
    assert record["source"] == "mirror" and record["mirror"] == a.published and record["commit"] == COMMIT
    assert record["endpoint"] == "https://huggingface.co"  # where worker A's files came from
    assert a.describe()["source"] == "hub" and a.describe()["mirror"] is None


def test_the_tokenizer_only_fetch_takes_no_weights_from_the_mirror(fleet):
    _, cache_b, mirror = fleet
    resolve_model(REPO, mirror=mirror)
    b = resolve_model(REPO, cache_dir=str(cache_b), mirror=mirror, weights=False)
    names = set(files_of(cache_b / "models--tiny-org--tiny-chat" / "snapshots" / COMMIT))
    assert b.mirror and "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith(".safetensors") for n in names)
    assert resolve_model(REPO, cache_dir=str(cache_b), mirror=mirror, commit=b.commit).mirror == b.mirror
    assert any(n.endswith(".safetensors") for n in files_of(cache_b / "models--tiny-org--tiny-chat" / "snapshots"))


def test_a_mirrored_snapshot_without_its_completion_record_is_not_used(fleet, empty_bucket):
    _, cache_b, mirror = fleet
    resolve_model(REPO, mirror=mirror)
    boto3.client("s3").delete_object(Bucket=empty_bucket, Key=f"{SNAPSHOTS}/{COMMIT}/manifest.json")  # a half-upload
    with pytest.raises(HubModelUnavailable, match="is not in the Hugging Face cache .* and HF_HUB_OFFLINE is set"):
        resolve_model(REPO, cache_dir=str(cache_b), mirror=mirror)
    assert not (cache_b / "models--tiny-org--tiny-chat" / "snapshots").exists()


def test_a_corrupted_file_in_the_mirror_is_refused_and_nothing_enters_the_cache(fleet, empty_bucket):
    _, cache_b, mirror = fleet
    resolve_model(REPO, mirror=mirror)
    key = f"{SNAPSHOTS}/{COMMIT}/model.safetensors"
    data = boto3.client("s3").get_object(Bucket=empty_bucket, Key=key)["Body"].read()
    boto3.client("s3").put_object(Bucket=empty_bucket, Key=key, Body=data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ChecksumMismatchError) as error:
        resolve_model(REPO, cache_dir=str(cache_b), mirror=mirror)
    assert "mirror's copy of tiny-org/tiny-chat at commit" in str(error.value) and "is corrupt" in str(error.value)
    assert "model.safetensors: sha256 differs" in str(error.value) and "Delete that prefix" in str(error.value)
    repo_b = cache_b / "models--tiny-org--tiny-chat"
    assert not (repo_b / "snapshots").exists() and not (repo_b / "blobs").exists()
    assert not [p for p in repo_b.iterdir() if p.name.startswith(".mirror-")]  # no download left behind


def test_the_mirror_pins_the_first_commit_of_a_branch_until_told_otherwise(fleet, tiny_model, empty_bucket):
    cache_a, cache_b, mirror = fleet
    assert resolve_model(REPO, mirror=mirror).commit == COMMIT
    add_to_hub_cache(cache_a, REPO, tiny_model, commit=NEWER)  # the branch moved on the Hub since
    assert resolve_model(REPO, mirror=mirror).commit == COMMIT  # pinned: every worker trains the same weights
    assert resolve_model(REPO, revision=NEWER, mirror=mirror).commit == NEWER  # naming the commit moves it
    assert resolve_model(REPO, cache_dir=str(cache_b), mirror=mirror).commit == COMMIT  # the ref was not moved
    boto3.client("s3").delete_object(Bucket=empty_bucket, Key="hub-mirror/models--tiny-org--tiny-chat/refs/main")
    assert resolve_model(REPO, mirror=mirror).commit == NEWER  # so does deleting the ref: the next fetch pins
    ref = boto3.client("s3").get_object(Bucket=empty_bucket, Key="hub-mirror/models--tiny-org--tiny-chat/refs/main")
    assert ref["Body"].read() == NEWER.encode()


@pytest.mark.parametrize("mirror,expected", [("s3://", "names no bucket"), ("mirror/hub", "give an s3://bucket")])
def test_a_mirror_setting_that_is_not_a_prefix_names_the_fix(tiny_model, tmp_path, mirror, expected):
    with pytest.raises(ValidationError, match=expected):
        tiny_config("Qwen/Qwen2.5-0.5B-Instruct", tmp_path, hub={"mirror": mirror})


def test_routing_reads_the_config_of_the_commit_the_mirror_pins(fleet, tiny_model):
    """A CPU routing worker with an empty cache and no Hub plans from the mirror's copy (config and tokenizer)."""
    from tasks.planning.routing import read_model_shape
    from tasks.store.hub import HubSettings

    _, cache_b, mirror = fleet
    resolve_model(REPO, mirror=mirror)
    shape = read_model_shape(REPO, hub=HubSettings(cache_dir=str(cache_b), mirror=mirror))
    assert shape.model_type == "llama"
    names = set(files_of(cache_b / "models--tiny-org--tiny-chat" / "snapshots" / COMMIT))
    assert "config.json" in names and not any(n.endswith(".safetensors") for n in names)


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_the_flows_fetch_stage_takes_tokenizer_then_weights_of_one_commit_from_the_mirror(fleet):
    """As flows/finetune.py calls it: config.json and the tokenizer first, then the same commit's weights."""
    from prefect import flow

    from tasks.base_model import fetch_model

    _, cache_b, mirror = fleet
    resolve_model(REPO, mirror=mirror)

    @flow
    def fetch_twice(config):
        first = fetch_model(config, weights=False)
        return first, fetch_model(config, commit=first.commit)

    config = tiny_config(REPO, cache_b.parent, hub={"cache_dir": str(cache_b), "mirror": mirror})
    first, model = fetch_twice(config)
    assert first.commit == model.commit == COMMIT and first.mirror == model.mirror
    assert model.describe()["source"] == "mirror" and model.describe()["requested_revision"] is None
    assert any(p.suffix == ".safetensors" for p in (cache_b / "models--tiny-org--tiny-chat" / "snapshots").rglob("*"))


def test_a_record_whose_path_leaves_the_cache_is_refused_before_anything_is_read(fleet, empty_bucket):
    from tasks.store.objects import UnsafeKeyError

    _, cache_b, mirror = fleet
    resolve_model(REPO, mirror=mirror)
    key = f"{SNAPSHOTS}/{COMMIT}/manifest.json"
    record = json.loads(boto3.client("s3").get_object(Bucket=empty_bucket, Key=key)["Body"].read())
    record["files"][0]["path"] = "../../../escaped.json"
    boto3.client("s3").put_object(Bucket=empty_bucket, Key=key, Body=json.dumps(record).encode())
    with pytest.raises(UnsafeKeyError, match=r"/\.\./\.\./\.\./escaped\.json'.*manifest\.json.*'\.\.' segment"):
        resolve_model(REPO, cache_dir=str(cache_b), mirror=mirror, weights=False)
    assert not (cache_b / "escaped.json").exists()
