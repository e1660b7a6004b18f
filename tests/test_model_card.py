"""The model card's metadata is huggingface_hub's ModelCardData: it parses back with `ModelCard.load` into the
base model, the license copied from the base model's own card, the datasets by URI with their sha256, and
the tuned model's held-out scores as model-index eval results."""
from __future__ import annotations

import pytest

from tasks.reports.model_card import base_model_license, model_card

SOURCES = [
    {"uri": "s3://data/support/train.jsonl", "sha256": "a" * 64, "rows": 40, "data_format": "chat"},
    {"uri": "s3://data/support/eval.jsonl", "sha256": "b" * 64, "rows": 16, "data_format": "chat"},
]


def facts(license_fields: dict) -> dict:
    scores = {"exact_match": 0.875, "rouge1": 0.91}
    return {
        "run_id": "20261201-120000-abcd1234",
        "base_model": {"path": "/cache/snapshots/c0ffee", "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                       "revision": "c0ffee", "model_type": "llama", "parameters": 134_515_008,
                       "license": license_fields},
        "data": {"sources": SOURCES, "train_rows": 40, "eval_rows": 16, "eval_origin": "held-out file"},
        "method": "lora",
        "training": {"steps": 20, "best_eval_loss": 0.0195, "best_step": 20, "trainable_parameters": 1,
                     "total_parameters": 2},
        "evaluation": {"metric": "exact_match",
                       "base": {"label": "base", "loss": 2.2057, "perplexity": 9.08, "score": 0.0,
                                "scores": {"exact_match": 0.0}},
                       "tuned": {"label": "tuned", "loss": 0.0195, "perplexity": 1.02, "score": 0.875,
                                 "scores": scores}},
        "adapter_only": False,
        "publish_dtype": "float32",
    }


def written(tmp_path, text: str):
    from huggingface_hub import ModelCard

    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


def test_the_card_parses_back_with_base_model_license_datasets_and_eval_results(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# SmolLM2\n")
    card = written(tmp_path, model_card(**facts(base_model_license(str(base)))))
    data = card.data

    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.library_name == "transformers"
    assert data.license == "apache-2.0"  # copied from the base model's card
    assert data.datasets == [s["uri"] for s in SOURCES]
    assert data.dataset_checksums == [{"uri": s["uri"], "sha256": s["sha256"], "rows": s["rows"]} for s in SOURCES]
    results = {r.metric_type: r for r in data.eval_results}
    assert {name: r.metric_value for name, r in results.items()} == {
        "eval_loss": 0.0195, "perplexity": 1.02, "exact_match": 0.875, "rouge1": 0.91}
    held_out = results["exact_match"]
    # the eval rows: the held-out file, pinned by its sha256
    assert (held_out.dataset_type, held_out.dataset_name, held_out.dataset_revision) == (
        "s3://data/support/eval.jsonl", "eval.jsonl", "b" * 64)
    assert card.content.count("model-index") == 1 and "License: `apache-2.0`, from the base model's card." in card.text


def test_a_split_eval_set_points_at_the_training_data_and_other_licenses_keep_name_and_link(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: acme-ml-1.0\n"
                                    "license_link: https://example.com/LICENSE\n---\n")
    fields = facts(base_model_license(str(base)))
    fields["data"] = {**fields["data"], "sources": SOURCES[:1], "eval_origin": "10% of data, seed 42"}
    data = written(tmp_path, model_card(**fields)).data
    assert (data.license, data.license_name, data.license_link) == (
        "other", "acme-ml-1.0", "https://example.com/LICENSE")
    result = data.eval_results[0]
    assert (result.dataset_type, result.dataset_revision, result.dataset_split) == (
        SOURCES[0]["uri"], SOURCES[0]["sha256"], "10% of data, seed 42")


@pytest.mark.parametrize("readme", [None, "# no metadata at all\n", "---\nlicense: [unclosed\n---\n"])
def test_a_base_without_a_readable_license_gives_none_and_the_card_says_so(tmp_path, readme):
    base = tmp_path / "base"
    base.mkdir()
    if readme is not None:
        (base / "README.md").write_text(readme)
    assert base_model_license(str(base)) == {}
    card = written(tmp_path, model_card(**facts({})))
    assert card.data.license is None and "the base model's card states none" in card.text
