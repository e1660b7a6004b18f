"""A Hugging Face Hub id (`org/name`) as the model, offline: resolved from a Hub cache laid out as
huggingface_hub lays it out (tests/hub_cache.py), with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it."""
import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from conftest import DEMO_DATA, ROOT, tiny_config
from hub_cache import COMMIT, add_to_hub_cache, offline_hub_cache
from tasks.store.hub import HubModelUnavailable, is_hub_id, resolve_model

REPO = "tiny-org/tiny-chat"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, and the Hub out of reach as HF_HUB_OFFLINE=1 makes it. huggingface_hub reads the
    variables when it is imported, so its constants are set too for this (already importing) process."""
    return offline_hub_cache(tmp_path / "hf-cache", monkeypatch)


def offline_env(cache) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


def cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE as a user's would."""
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_test_cache_is_the_layout_huggingface_hub_reads(tiny_model, hub_cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    snapshot = add_to_hub_cache(hub_cache, REPO, tiny_model)
    found = try_to_load_from_cache(REPO, "config.json", cache_dir=hub_cache)
    assert found == str(snapshot / "config.json")
    assert try_to_load_from_cache(REPO, "config.json", cache_dir=hub_cache, revision=COMMIT) == found
    [repo] = scan_cache_dir(hub_cache).repos
    assert repo.repo_id == REPO and [r.commit_hash for r in repo.revisions] == [COMMIT]
    assert {"main"} == set(next(iter(repo.revisions)).refs)


def test_a_hub_id_resolves_to_its_cached_snapshot_and_commit(tiny_model, hub_cache):
    add_to_hub_cache(hub_cache, REPO, tiny_model)
    model = resolve_model(REPO)
    assert model.repo_id == REPO and model.commit == COMMIT and model.requested == REPO
    assert model.path.endswith(f"models--tiny-org--tiny-chat/snapshots/{COMMIT}")
    assert (resolve_model(REPO, revision=COMMIT).path == model.path)  # a commit sha as the revision
    local = resolve_model(str(tiny_model))  # a folder is used as it is
    assert local.path == str(tiny_model) and local.repo_id is None and local.commit is None


def test_a_folder_that_exists_wins_over_a_hub_id_of_the_same_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("some-org/model")
    (tmp_path / "some-org" / "model").mkdir(parents=True)
    assert not is_hub_id("some-org/model")
    assert not is_hub_id("s3://bucket/model") and not is_hub_id("/models/llama") and not is_hub_id("llama")


def test_a_model_missing_from_the_cache_offline_says_what_to_do(hub_cache):
    with pytest.raises(HubModelUnavailable) as error:
        resolve_model("acme/not-downloaded", revision="v1")
    message = str(error.value)
    assert "model='acme/not-downloaded' (model_revision='v1') is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert f"hf download acme/not-downloaded --revision v1 --cache-dir {hub_cache}" in message
    assert "or set model to a local folder holding the model" in message


def test_a_snapshot_with_config_json_alone_serves_the_plan_but_not_training(tiny_model, hub_cache):
    add_to_hub_cache(hub_cache, REPO, tiny_model, only=("config.json", "tokenizer.json", "tokenizer_config.json"))
    assert resolve_model(REPO, weights=False).commit == COMMIT
    with pytest.raises(HubModelUnavailable, match=r"lacks weights \(\*\.safetensors\).*`hf download tiny-org/tiny"):
        resolve_model(REPO)


@pytest.mark.parametrize("pickles,code", [(False, False), (True, True)])
def test_weights_come_as_safetensors_unless_pickles_and_code_are_allowed(tiny_model, hub_cache, monkeypatch,
                                                                          pickles, code):
    import huggingface_hub

    asked = {}
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: asked.update(kw) or real(*a, **kw))
    add_to_hub_cache(hub_cache, REPO, tiny_model)
    resolve_model(REPO, allow_pickles=pickles, remote_code=code)
    assert asked["allow_patterns"] is None and "original/*" in asked["ignore_patterns"]
    assert ("*.bin" in asked["ignore_patterns"]) is not pickles and ("*.py" in asked["ignore_patterns"]) is not code
    resolve_model(REPO, weights=False)
    assert "config.json" in asked["allow_patterns"] and not any("safetensors" in p for p in asked["allow_patterns"])


def test_the_config_names_a_hub_model_and_its_revision(tiny_model, tmp_path):
    config = tiny_config("Qwen/Qwen2.5-0.5B-Instruct", tmp_path, model_revision="main",
                         hub={"cache_dir": "/shared/hf", "token_secret": "hf-token"})
    assert config.model_revision == "main" and config.hub.cache_dir == "/shared/hf"


@pytest.mark.parametrize("model,overrides,expected", [
    ("Qwen/Qwen2.5-0.5B-Instruct@v2", {},
     "give the revision separately, as transformers' `revision=` does: model='Qwen/Qwen2.5-0.5B-Instruct', "
     "model_revision='v2'"),
    (None, {"model_revision": "main"}, "model_revision='main' is for a Hugging Face Hub id (org/name)"),
    ("Qwen/Qwen2.5-0.5B-Instruct", {"model_revision": " "}, "model_revision is empty"),
    (None, {"hub": {"cache": "/x"}}, "hub.cache\n  Extra inputs are not permitted"),
])
def test_model_settings_that_do_not_fit_together_name_the_fix(tiny_model, tmp_path, model, overrides, expected):
    with pytest.raises(ValidationError) as error:
        tiny_config(model or tiny_model, tmp_path, **overrides)
    assert expected in str(error.value)


def test_config_problems_are_reported_together(tiny_model, tmp_path):
    with pytest.raises(ValidationError) as error:
        tiny_config("org/name@rev", tmp_path, data="s3://bucket-only")
    assert "model='org/name@rev'" in str(error.value) and "data='s3://bucket-only' names a bucket" in str(error.value)


def test_plan_reads_config_json_alone_from_a_hub_id(tiny_model, tmp_path):
    # Only config.json is cached, so a plan that touched any other file (the weights) would fail offline.
    cache = tmp_path / "hf-cache"
    add_to_hub_cache(cache, REPO, tiny_model, only=("config.json",))
    done = cli(["plan", "--model", REPO, "--gpu-gib", "24"], offline_env(cache))
    assert done.returncode == 0, done.stderr
    assert "model: llama" in done.stdout and "<- chosen" in done.stdout
    assert [p.name for p in (cache / "models--tiny-org--tiny-chat" / "snapshots" / COMMIT).iterdir()] == ["config.json"]


def test_plan_with_data_reads_the_tokenizer_too_but_no_weights(tiny_model, tmp_path):
    cache = tmp_path / "hf-cache"
    add_to_hub_cache(cache, REPO, tiny_model, only=("config.json", "tokenizer.json", "tokenizer_config.json"))
    done = cli(["plan", "--model", REPO, "--revision", COMMIT, "--gpu-gib", "24", "--data",
                str(DEMO_DATA / "train.jsonl")], offline_env(cache))
    assert done.returncode == 0, done.stderr
    assert f"40 rows of {DEMO_DATA / 'train.jsonl'}" in done.stdout


def test_plan_of_a_hub_model_not_cached_offline_exits_2_with_what_to_do(tmp_path):
    cache = tmp_path / "hf-cache"
    done = cli(["plan", "--model", "acme/not-downloaded", "--gpu-gib", "24"], offline_env(cache))
    assert done.returncode == 2, done.stderr
    assert "model='acme/not-downloaded' is not in the Hugging Face cache" in done.stderr
    assert "HF_HUB_OFFLINE is set" in done.stderr
    assert f"hf download acme/not-downloaded --cache-dir {cache}" in done.stderr


def test_an_unreachable_hub_endpoint_is_named_in_the_error(tmp_path):
    """HF_ENDPOINT (a mirror) is what huggingface_hub asks: nothing here overrides it. Port 9 on 127.0.0.1
    refuses connections, so the error must name that endpoint, and say what to do."""
    env = {**offline_env(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = cli(["plan", "--model", "acme/not-downloaded", "--gpu-gib", "24"], env)
    assert done.returncode == 2, done.stderr
    assert "the Hub (http://127.0.0.1:9, set by HF_ENDPOINT) cannot be reached" in done.stderr
    assert "hf download acme/not-downloaded" in done.stderr


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_a_run_from_a_hub_id_trains_and_records_the_commit(tiny_model, tmp_path, hub_cache, monkeypatch):
    import huggingface_hub
    from prefect.blocks.system import Secret

    from flows.finetune import finetune

    tokens = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **kw: tokens.append(kw["token"]) or real(*a, **kw))
    add_to_hub_cache(hub_cache, REPO, tiny_model)
    Secret(value="hf_offlineTestToken").save("hf-token", overwrite=True)  # read, then unused offline
    config = tiny_config(REPO, tmp_path, method="lora", hub={"token_secret": "hf-token"},
                         training={"max_steps": 2, "batch_size": 8, "max_seq_len": 128, "eval_every": 2})
    result = finetune(config)
    assert tokens == ["hf_offlineTestToken"] * 2  # the Secret's token, for the tokenizer's and the weights' fetch
    run = tmp_path / "out" / "runs" / result.run_id
    manifest = json.loads((run / "manifest.json").read_text())
    base = manifest["base_model"]
    assert base["repo_id"] == REPO and base["commit"] == COMMIT and base["revision"] == COMMIT
    assert base["requested_revision"] is None and base["endpoint"] == "https://huggingface.co"
    assert base["path"].endswith(f"snapshots/{COMMIT}")
    assert manifest["config"]["model"] == REPO  # the config as given, not the cache folder
    card = (run / "merged" / "README.md").read_text()
    assert f"base_model: {REPO}\n" in card and f"commit `{COMMIT}`" in card
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == REPO and adapter["revision"] == COMMIT  # not the worker's cache
    published = [p for p in run.rglob("*") if p.suffix in (".json", ".md") and p.name != "manifest.json"]
    assert [p.name for p in published if str(hub_cache) in p.read_text()] == []


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_a_run_from_a_hub_id_not_cached_fails_before_ingest_with_what_to_do(tiny_model, tmp_path, hub_cache):
    from flows.finetune import finetune

    state = finetune(tiny_config("acme/not-downloaded", tmp_path), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "is not in the Hugging Face cache" in message and "hf download acme/not-downloaded" in message
    assert not (tmp_path / "out").exists()
