"""`prefect-finetune promote` and `rollback`: moving latest.json by hand, with the registry's checks."""
import json

import pytest
from test_registry import GO, publish_run

from tasks.cli import main
from tasks.store.objects import join_uri
from tasks.store.registry import history, promote, read_latest, run_uri


@pytest.fixture
def output(tmp_path) -> str:
    out = str(tmp_path / "out")
    for run_id in ("run-a", "run-b"):
        publish_run(out, tmp_path, run_id)
    return out


def test_promote_then_roll_back_and_forth(output, capsys):
    assert main(["promote", output, "run-a", "--reason", "ship a"]) == 0
    assert read_latest(output)["decision"] == {"promote": True, "reason": "ship a", "by": "cli"}
    assert main(["promote", output, "run-b"]) == 0
    assert "latest.json -> run run-b" in capsys.readouterr().out and read_latest(output)["run_id"] == "run-b"
    assert main(["rollback", output]) == 0
    latest = read_latest(output)
    assert latest["run_id"] == "run-a" and latest["previous"]["run_id"] == "run-b"
    assert latest["decision"]["reason"] == "rolled back by hand"
    assert [p["run_id"] for p in history(output)] == ["run-a", "run-b"]  # every replaced pointer kept


def test_an_incomplete_or_unknown_run_is_refused_and_latest_stays(output, capsys):
    promote(output, "run-a", GO)
    model = join_uri(run_uri(output, "run-b"), "merged/model.safetensors")
    open(model, "wb").write(b"x" * len(b"run-b" * 100))  # same size, other bytes
    assert main(["promote", output, "run-b"]) == 1
    assert "run-b is incomplete" in capsys.readouterr().err
    assert main(["promote", output, "run-z"]) == 2
    assert read_latest(output)["run_id"] == "run-a"


def test_rollback_needs_a_run_before_the_latest(output, capsys):
    assert main(["rollback", output]) == 2  # nothing promoted yet
    assert "no latest.json" in capsys.readouterr().err
    promote(output, "run-a", GO)
    assert main(["rollback", output]) == 1
    assert "first promoted run" in capsys.readouterr().err
    assert json.loads(open(join_uri(output, "latest.json")).read())["run_id"] == "run-a"
