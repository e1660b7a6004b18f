"""The ingest task on a real temporary Prefect server: policy, quarantine accounting, caching, artifact."""
import json

import pytest
from prefect import flow

from conftest import tiny_config
from tasks.data.schemas import DatasetError
from tasks.ingest import ingest
from tasks.results import RunInfo

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


@flow
def ingest_only(config, run):
    return ingest(config, run)


def run_info(tmp_path, name="run") -> RunInfo:
    (tmp_path / name).mkdir()
    return RunInfo(run_id=name, flow_run_id=None, run_dir=str(tmp_path / name), output_uri=str(tmp_path / "out"),
                   started_at="now")


def write_rows(path, bad_every: int = 0, count: int = 40):
    rows = []
    for i in range(count):
        row = {"prompt": f"Question number {i}?", "completion": f"Answer {i}."}
        if bad_every and i % bad_every == 3:
            row["completion"] = "  "  # blank: a rule every validator must catch
        rows.append(json.dumps(row))
    rows.append(json.dumps({"prompt": "question NUMBER 0?", "completion": "Answer 0."}))  # a near duplicate
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_quarantine_keeps_the_good_rows_and_accounts_for_every_row(tiny_model, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", bad_every=10)
    config = tiny_config(tiny_model, tmp_path, data=data, eval_data=None,
                         data_checks={"on_invalid": "quarantine", "max_quarantined_fraction": 0.2})
    result = ingest_only(config, run_info(tmp_path))
    source = result.sources[0]
    assert (source.read, source.rows, source.quarantined) == (41, 36, 5)
    assert source.read == source.rows + source.quarantined
    assert source.problems == {"not_blank": 4, "near_duplicate": 1}
    assert result.train_rows + result.eval_rows == 36
    records = [json.loads(line) for line in open(result.quarantine_paths[0])]
    assert [r["line"] for r in records] == [4, 14, 24, 34, 41]
    assert records[0]["reasons"] == ["not_blank completion: got '  '"]
    assert records[0]["data"] == {"prompt": "Question number 3?", "completion": "  "}
    assert records[-1]["reasons"] == ["near_duplicate: same as line 1"]
    assert records[-1]["data"] == {"prompt": "question NUMBER 0?", "completion": "Answer 0."}
    kept = [json.loads(line)["row"] for name in ("train.jsonl", "eval.jsonl")
            for line in open(tmp_path / "run" / "data" / name)]
    assert sorted(kept + [r["line"] for r in records]) == list(range(1, 42))


def test_fail_policy_stops_with_every_problem(tiny_model, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", bad_every=10)
    with pytest.raises(DatasetError) as caught:
        ingest_only(tiny_config(tiny_model, tmp_path, data=data, eval_data=None), run_info(tmp_path))
    text = str(caught.value)
    assert "5 problem(s) in 5 of 41 row(s)" in text and f"{data} line 4: got '  '" in text
    assert f"{data} line 41: same as line 1" in text and "set it to 'quarantine'" in text


def test_too_many_bad_rows_fail_even_under_quarantine(tiny_model, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", bad_every=10)
    config = tiny_config(tiny_model, tmp_path, data=data, eval_data=None, data_checks={"on_invalid": "quarantine"})
    with pytest.raises(DatasetError, match=r"5 of 41 rows are bad, more than data_checks.max_quarantined_fraction=0.05"):
        ingest_only(config, run_info(tmp_path))


def test_leaked_eval_rows_are_quarantined(tiny_model, tmp_path):
    train = write_rows(tmp_path / "train.jsonl")
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in
                                   [("Held out?", "Yes."), ("QUESTION number 7?", "Answer   7."), ("Other?", "No.")]))
    config = tiny_config(tiny_model, tmp_path, data=train, eval_data=str(eval_path),
                         data_checks={"on_invalid": "quarantine", "max_quarantined_fraction": 0.5})
    result = ingest_only(config, run_info(tmp_path))
    assert [s.problems for s in result.sources] == [{"near_duplicate": 1}, {"leakage": 1}]
    assert result.eval_rows == 2
    leaked = [json.loads(line) for line in open(tmp_path / "run" / "quarantine" / "eval.jsonl")]
    assert leaked[0]["line"] == 2 and leaked[0]["reasons"][0].startswith("leakage")


def test_validation_is_cached_on_content(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    write_rows(data)
    config = tiny_config(tiny_model, tmp_path, data=str(data), eval_data=None,
                         data_checks={"duplicates": "allow"})
    first = ingest_only(config, run_info(tmp_path, "first"))
    again = ingest_only(config, run_info(tmp_path, "again"))
    assert first.sources[0].validation == "ran" and again.sources[0].validation == "cached"
    assert again.train_rows == first.train_rows == 37
    data.write_text(data.read_text() + json.dumps({"prompt": "New?", "completion": "Yes."}) + "\n")
    changed = ingest_only(config, run_info(tmp_path, "changed"))
    assert changed.sources[0].validation == "ran" and changed.train_rows + changed.eval_rows == 42


def test_statistics_table_artifact(tiny_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    data = write_rows(tmp_path / "train.jsonl", bad_every=20)
    config = tiny_config(tiny_model, tmp_path, data=data, eval_data=None,
                         data_checks={"on_invalid": "quarantine", "max_quarantined_fraction": 0.2})
    ingest_only(config, run_info(tmp_path))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-data"])))
    table = json.loads(max(artifacts, key=lambda a: a.created).data)
    assert table[0]["source"] == data and (table[0]["read"], table[0]["kept"], table[0]["quarantined"]) == (41, 38, 3)
    assert table[0]["problems"] == "not_blank 2, near_duplicate 1"


def test_token_lengths_are_reported_and_heavy_truncation_fails(tiny_model, tmp_path):
    data = write_rows(tmp_path / "train.jsonl")
    config = tiny_config(tiny_model, tmp_path, data=data, eval_data=None, data_checks={"duplicates": "allow"})
    result = ingest_only(config, run_info(tmp_path, "ok"))
    train = result.token_lengths["train"]
    assert train["rows"] == result.train_rows and train["share_truncated"] == 0 and train["tokens_lost"] == 0
    assert sum(train["histogram"].values()) == result.train_rows
    short = tiny_config(tiny_model, tmp_path, data=data, eval_data=None, data_checks={"duplicates": "allow",
                        "max_truncated_fraction": 0.5}, training={"max_seq_len": 16})
    with pytest.raises(DatasetError, match=r"train.jsonl: 100.0% of rows are longer than training.max_seq_len=16 tokens"):
        ingest_only(short, run_info(tmp_path, "short"))


def other_rows(path, count: int, blank: tuple[int, ...] = ()) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Other question {i}?", "completion": " " if i in blank else
                                        f"Other answer {i}."}) + "\n" for i in range(count)))
    return str(path)


def test_each_source_of_a_mix_keeps_its_own_quarantine_and_the_mix_is_recorded(tiny_model, tmp_path):
    a = write_rows(tmp_path / "a.jsonl", bad_every=10)  # 41 rows, 5 bad
    b = other_rows(tmp_path / "b.jsonl", 20, blank=(7,))  # 20 rows, line 8 bad
    eval_path = tmp_path / "eval.jsonl"  # line 1 is a row of b: leakage is checked against every source
    eval_path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in
                                 [("Other question 2?", "Other answer 2."), ("Held out?", "Yes."), ("New?", "No.")]))
    config = tiny_config(tiny_model, tmp_path, data=[{"path": a, "weight": 3}, {"path": b, "max_rows": 10}],
                         eval_data=str(eval_path),
                         data_checks={"on_invalid": "quarantine", "max_quarantined_fraction": 0.4})
    result = ingest_only(config, run_info(tmp_path))
    assert [(s.uri, s.read, s.rows, s.quarantined, s.problems) for s in result.sources] == [
        (a, 41, 36, 5, {"not_blank": 4, "near_duplicate": 1}), (b, 20, 19, 1, {"not_blank": 1}),
        (str(eval_path), 3, 2, 1, {"leakage": 1})]
    assert [p.rsplit("/", 1)[-1] for p in result.quarantine_paths] == ["train-1-a.jsonl", "train-2-b.jsonl",
                                                                       "eval.jsonl"]
    assert [json.loads(line)["line"] for line in open(result.quarantine_paths[1])] == [8]
    assert result.mix["seed"] == config.training.seed and result.mix["rows"] == result.train_rows == 46
    assert [(s["path"], s["weight"], s["max_rows"], s["usable_rows"], s["rows_taken"]) for s in result.mix["sources"]] \
        == [(a, 3, None, 36, 36), (b, None, 10, 19, 10)]
    trained = [json.loads(line) for line in open(result.train_path)]
    assert sum(r["source"] == a for r in trained) == 36 and sum(r["source"] == b for r in trained) == 10
    assert 8 not in [r["row"] for r in trained if r["source"] == b]  # b's quarantined row is never mixed in
    again = ingest_only(config, run_info(tmp_path, "again"))  # the same seed: the same rows in the same order
    assert open(again.train_path).read() == open(result.train_path).read()


def test_a_source_over_its_bad_row_limit_fails_even_when_the_mix_is_mostly_good(tiny_model, tmp_path):
    a = write_rows(tmp_path / "a.jsonl", bad_every=10)  # 5 of 41 bad: 12%
    b = other_rows(tmp_path / "b.jsonl", 300)  # all good: the mix as a whole is 2% bad
    config = tiny_config(tiny_model, tmp_path, data=[{"path": b, "weight": 1}, {"path": a, "weight": 1}],
                         eval_data=None, data_checks={"on_invalid": "quarantine", "max_quarantined_fraction": 0.1})
    with pytest.raises(DatasetError, match=rf"{a}: .*\n(.*\n)*5 of 41 rows are bad, more than "
                                           r"data_checks.max_quarantined_fraction=0.1"):
        ingest_only(config, run_info(tmp_path))
