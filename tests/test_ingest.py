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
