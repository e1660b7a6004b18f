"""A Hugging Face Hub dataset as training data, offline: a real dataset repository laid out in a temporary Hub cache
(tests/hub_cache.py), HF_HUB_OFFLINE=1, read by `datasets.load_dataset` and then checked as a file is."""
import json

import pytest
from prefect import flow

from conftest import tiny_config
from hub_cache import COMMIT, add_to_hub_cache, offline_hub_cache
from tasks.data.hub_datasets import local_copy, resolve_split
from tasks.data.schemas import DatasetError

REPO = "acme/support-chats"
URI = f"hf://datasets/{REPO}"
README = """---
configs:
- config_name: en
  default: true
  data_files:
  - split: train
    path: en/train.jsonl
  - split: test
    path: en/test.jsonl
- config_name: fr
  data_files:
  - split: train
    path: fr/train.jsonl
---
# support chats (a test dataset)
"""


def rows(language: str, count: int, blank: tuple[int, ...] = ()) -> str:
    return "".join(json.dumps({"prompt": f"[{language}] question {i}?",
                               "completion": " " if i in blank else f"[{language}] answer {i}."}) + "\n"
                   for i in range(count))


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    """The dataset repository in an offline Hub cache: config en (train 30 rows, row 5 blank; test 6) and fr."""
    import datasets

    cache = offline_hub_cache(tmp_path / "hf-cache", monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")  # not ~/.cache
    repo = tmp_path / "repo"
    for name, text in (("README.md", README), ("en/train.jsonl", rows("en", 30, blank=(4,))),
                       ("en/test.jsonl", rows("en", 6)), ("fr/train.jsonl", rows("fr", 12))):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    add_to_hub_cache(cache, REPO, repo, repo_type="dataset")
    return cache


def test_a_cached_split_is_read_offline_at_its_commit(hub_dataset, tmp_path):
    hub = resolve_split(URI, "fr", "train", None)
    assert (hub.repo_id, hub.commit, hub.config, hub.split) == (REPO, COMMIT, "fr", "train")
    path = local_copy(hub, str(tmp_path / "work"), max_rows=1000)
    assert path == tmp_path / "work" / "hub-datasets" / "acme--support-chats" / COMMIT / "fr" / "train.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()][3] == \
        {"prompt": "[fr] question 3?", "completion": "[fr] answer 3."}
    assert hub.describe() | {"endpoint": None} == {"repo_id": REPO, "config": "fr", "split": "train",
                                                   "requested_revision": None, "commit": COMMIT, "endpoint": None}
    assert not [p for p in (tmp_path / "datasets-cache").rglob("*") if p.is_file() and p.suffix != ".lock"]  # streamed
    # Named by its commit: a second run reads the copy without the Hub cache.
    (tmp_path / "hf-cache").rename(tmp_path / "gone")
    assert local_copy(hub, str(tmp_path / "work"), max_rows=1000) == path


def test_missing_datasets_configs_and_splits_say_what_to_do(hub_dataset, tmp_path):
    with pytest.raises(DatasetError) as error:
        resolve_split("hf://datasets/acme/not-downloaded", None, "train", "v1")
    assert "HF_HUB_OFFLINE is set" in str(error.value)
    assert "hf download acme/not-downloaded --repo-type dataset --revision v1" in str(error.value)
    for config, split, words in (("de", "train", ["'de' not found", "['en', 'fr']", "set the source's config"]),
                                 ("en", "validation", ["validation", "['train', 'test']", "set the source's split"])):
        with pytest.raises(DatasetError) as error:
            local_copy(resolve_split(URI, config, split, None), str(tmp_path / "work"), max_rows=1000)
        assert all(w in str(error.value) for w in words), str(error.value)
    with pytest.raises(DatasetError, match="more than data_checks.max_rows=10 rows"):
        local_copy(resolve_split(URI, "en", "train", None), str(tmp_path / "work"), max_rows=10)
    assert not list((tmp_path / "work").rglob("*.jsonl"))  # nothing half-written is left to be mistaken for a copy


@flow
def ingest_only(config, run):
    from tasks.ingest import ingest

    return ingest(config, run)


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_a_hub_split_is_validated_quarantined_and_recorded_like_a_file(hub_dataset, tiny_model, tmp_path):
    from tasks.results import RunInfo

    (tmp_path / "run").mkdir()
    run = RunInfo(run_id="run", flow_run_id=None, run_dir=str(tmp_path / "run"), output_uri="", started_at="now")
    config = tiny_config(tiny_model, tmp_path, data=URI, eval_data=None,
                         data_checks={"on_invalid": "quarantine", "max_quarantined_fraction": 0.1})
    result = ingest_only(config, run)
    [source] = result.sources
    assert (source.uri, source.read, source.rows, source.quarantined) == (URI, 30, 29, 1)
    assert source.hub | {"endpoint": None} == {"repo_id": REPO, "config": None, "split": "train",
                                               "requested_revision": None, "commit": COMMIT, "endpoint": None}
    [record] = [json.loads(line) for line in open(result.quarantine_paths[0])]
    assert record["file"] == f"{URI} (default config, split train, commit {COMMIT})" and record["line"] == 5
    assert record["reasons"] == ["not_blank completion: got ' '"]
    assert result.train_rows + result.eval_rows == 29

    strict = config.model_copy(update={"data_checks": config.data_checks.model_copy(update={"on_invalid": "fail"})})
    with pytest.raises(DatasetError) as error:  # the message names the dataset, the row and the field
        ingest_only(strict, run)
    assert f"{URI} (default config, split train, commit {COMMIT}) line 5: got ' '" in str(error.value), str(error.value)
    assert "column 'completion'" in str(error.value) and "hub-datasets" not in str(error.value)


def test_retraining_skips_a_hub_dataset_at_the_commit_already_trained_on(hub_dataset, tmp_path):
    from tasks.config import FinetuneConfig
    from tasks.data.freshness import unchanged_since_published

    config = FinetuneConfig(model="m", data=[{"path": URI, "config": "fr", "weight": 1}], output=str(tmp_path / "out"))
    folder = tmp_path / "out" / "runs" / "20261128-010000-aaaa"
    folder.mkdir(parents=True)

    def published(commit: str, split: str = "train") -> None:
        source = {"uri": URI, "sha256": "x", "hub": {"repo_id": REPO, "config": "fr", "split": split, "commit": commit}}
        mix = {"seed": config.training.seed, "sources": [{"path": URI, "weight": 1.0, "max_rows": None}]}
        (folder / "manifest.json").write_text(json.dumps({"data": {"mix": mix, "sources": [source]}}))

    published(COMMIT)
    assert "20261128-010000-aaaa" in unchanged_since_published(config)
    published("f" * 40)  # trained on an older commit of the dataset
    assert unchanged_since_published(config) is None
    published(COMMIT, split="test")  # the same commit, another split
    assert unchanged_since_published(config) is None
