"""Mixing several sources into one training set (tasks/data/mixing.py) and the config's list of sources. Pure."""
import pytest
from pydantic import ValidationError

from tasks.config import FinetuneConfig
from tasks.data.dataset import Dataset
from tasks.data.mixing import mix, mix_counts
from tasks.data.settings import DataSourceSpec


def source(path: str, rows: int) -> Dataset:
    return Dataset(source=path, sha256=path * 4, data_format="prompt_completion", format_evidence="keys",
                   conversations=[[{"role": "user", "content": f"{path} {i}"}, {"role": "assistant", "content": "a"}]
                                  for i in range(rows)], rows=list(range(1, rows + 1)))


def spec(path: str, weight: float | None = None, max_rows: int | None = None) -> DataSourceSpec:
    return DataSourceSpec(path=path, weight=weight, max_rows=max_rows)


@pytest.mark.parametrize("available,weights,expected", [
    ([1000, 100], [1, 1], [100, 100]),  # equal shares: the smaller source bounds the mix
    ([1000, 100], [0.9, 0.1], [900, 100]),
    ([1000, 100], [9, 1], [900, 100]),  # weights are relative: 9:1 is 0.9:0.1
    ([1000, 1000], [3, 1], [1000, 333]),  # the larger share runs out first
    ([10, 10, 10], [1, 1, 1], [10, 10, 10]),
    ([7, 50], [0.3, 0.7], [7, 16]),  # 23.33 rows in all -> 23, each source rounded so they add up
])
def test_weights_are_shares_of_the_mix_drawn_without_replacement(available, weights, expected):
    counts = mix_counts(available, [spec(f"s{i}", weight=w) for i, w in enumerate(weights)])
    assert counts == expected
    assert all(c <= n for c, n in zip(counts, available))  # never more rows than a source has: no repeats
    total = sum(counts)
    for count, weight in zip(counts, weights):  # each share within one row of its weight's
        assert abs(count - total * weight / sum(weights)) < 1


def test_a_capped_source_gives_its_cap_or_all_it_has_on_top_of_the_weighted_part():
    specs = [spec("big", weight=1), spec("capped", max_rows=30), spec("short", max_rows=500)]
    assert mix_counts([400, 100, 80], specs) == [400, 30, 80]
    assert mix_counts([400, 100], [spec("a", max_rows=10), spec("b", max_rows=20)]) == [10, 20]


def test_the_mix_is_the_same_for_the_same_seed_and_records_what_each_source_gave():
    datasets = [source("a.jsonl", 60), source("b.jsonl", 20)]
    specs = [spec("a.jsonl", weight=3), spec("b.jsonl", weight=1)]
    first, record = mix(datasets, specs, seed=7)
    again, _ = mix(datasets, specs, seed=7)
    other, _ = mix(datasets, specs, seed=8)
    assert first.conversations == again.conversations and first.origins == again.origins
    assert first.conversations != other.conversations  # the seed decides which rows, and their order
    assert len(first) == 80 and first.origins.count("a.jsonl") == 60 and first.origins.count("b.jsonl") == 20
    assert record["seed"] == 7 and record["rows"] == 80
    assert [(s["path"], s["weight"], s["usable_rows"], s["rows_taken"], s["share_of_mix"]) for s in record["sources"]] \
        == [("a.jsonl", 3, 60, 60, 0.75), ("b.jsonl", 1, 20, 20, 0.25)]
    # Each row keeps its source and its row number there; none is taken twice.
    pairs = list(zip(first.origins, first.rows))
    assert len(set(pairs)) == len(pairs)
    assert all(conversation[0]["content"] == f"{origin} {row - 1}"
               for conversation, origin, row in zip(first.conversations, first.origins, first.rows))
    assert first.origins[:20] != ["a.jsonl"] * 20  # shuffled together, not one source after the other


def test_a_capped_sample_is_a_seeded_subset_of_the_usable_rows():
    datasets = [source("a.jsonl", 100), source("b.jsonl", 100)]
    specs = [spec("a.jsonl", max_rows=10), spec("b.jsonl", weight=1)]
    def sample(seed: int) -> list[int]:
        mixed, _ = mix(datasets, specs, seed=seed)
        return sorted(row for origin, row in zip(mixed.origins, mixed.rows) if origin == "a.jsonl")

    first, record = mix(datasets, specs, seed=1)
    assert len(sample(1)) == 10 and sample(1) != list(range(1, 11))  # a sample, not the first rows
    assert sample(1) == sample(1) and sample(1) != sample(2)
    assert [s["rows_taken"] for s in record["sources"]] == [10, 100]


def config(data) -> FinetuneConfig:
    return FinetuneConfig(model="m", data=data)


@pytest.mark.parametrize("data,words", [
    ([{"path": "a.jsonl"}], ["data source 'a.jsonl'", "give either weight or max_rows", "add weight: 1"]),
    ([{"path": "a.jsonl", "weight": 1, "max_rows": 5}], ["give either weight or max_rows", "drop one of them"]),
    ([{"path": "a.jsonl", "weight": 0}], ["data.list", "0.weight", "greater than 0"]),
    ([{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "max_rows": 0}],
     ["1.max_rows", "greater than or equal to 1"]),
    ([{"path": "a.jsonl", "weight": 1, "split": "train"}], ["split applies only to a Hub dataset", "drop it"]),
    ([{"path": "a.txt", "weight": 1}], ["data[0].path='a.txt' has an unsupported suffix"]),
    ([{"path": "a.jsonl", "weight": 1}, {"path": "a.jsonl", "weight": 2}], ["data[1]: 'a.jsonl' is listed twice"]),
    ([], ["data is an empty list"]),
    ([{"path": "hf://datasets/alpaca", "weight": 1}], ["data[0].path", "hf://datasets/<org>/<name>"]),
    ("hf://datasets/org/set@v2", ["give the revision separately", "revision: 'v2'"]),
    ([{"path": "a.jsonl", "weight": 1, "wieght": 2}], ["wieght", "Extra inputs are not permitted"]),
])
def test_a_bad_list_of_sources_is_refused_naming_the_source_and_the_fix(data, words):
    with pytest.raises(ValidationError) as error:
        config(data)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_a_single_path_is_a_mix_of_one_and_a_list_keeps_its_sources():
    assert config("a.jsonl").data_sources() == [DataSourceSpec(path="a.jsonl", weight=1.0)]
    mixed = config([{"path": "a.jsonl", "weight": 2}, {"path": "hf://datasets/org/set", "max_rows": 50,
                                                      "config": "en", "split": "train[:10%]", "revision": "v2"}])
    assert [(s.path, s.weight, s.max_rows, s.split) for s in mixed.data_sources()] == [
        ("a.jsonl", 2.0, None, None), ("hf://datasets/org/set", None, 50, "train[:10%]")]
    assert mixed.data_label == "a.jsonl + hf://datasets/org/set"
    with pytest.raises(ValidationError, match="data_etag is set but data="):
        FinetuneConfig(model="m", data=[{"path": "s3://b/a.jsonl", "weight": 1}], data_etag="abc")


def test_the_list_of_sources_is_in_the_json_schema_the_run_form_renders():
    schema = FinetuneConfig.model_json_schema()
    variants = schema["properties"]["data"]["anyOf"]
    assert {"type": "string"} in variants
    [listed] = [v for v in variants if v.get("type") == "array"]
    spec_schema = schema["$defs"][listed["items"]["$ref"].rsplit("/", 1)[-1]]
    assert spec_schema["required"] == ["path"] and spec_schema["additionalProperties"] is False
    weight = next(v for v in spec_schema["properties"]["weight"]["anyOf"] if v.get("type") == "number")
    assert weight["exclusiveMinimum"] == 0  # the server refuses weight 0 before a run is created
