"""`prefect-finetune validate`: the ingest task's checks on a dataset, without a run, a model or Prefect."""
import json
import subprocess
import sys

from conftest import DEMO_DATA, ROOT
from tasks.cli import main

TRAIN, EVAL = str(DEMO_DATA / "train.jsonl"), str(DEMO_DATA / "eval.jsonl")


def write(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def mixed(tmp_path) -> str:
    return write(tmp_path / "mixed.jsonl", ['{"prompt": "a", "completion": "b"}', "{broken",
                                            '{"prompt": "c", "completion": ""}', '{"prompt": "d", "completion": "e"}'])


def test_usable_data_exits_0_and_needs_no_prefect():
    code = ("import sys; from tasks.cli import main; rc = main(['validate', %r, '--eval-data', %r]); "
            "assert 'prefect' not in sys.modules and 'torch' not in sys.modules, 'validate imported prefect or torch'; "
            "sys.exit(rc)") % (TRAIN, EVAL)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "40 read = 40 kept + 0 bad" in result.stdout and "usable: yes" in result.stdout


def test_bad_rows_exit_1_naming_file_row_and_field(tmp_path, capsys):
    path = mixed(tmp_path)
    assert main(["validate", path]) == 1
    out = capsys.readouterr().out
    assert f"{path} line 2: invalid JSON" in out
    assert "column 'completion'" in out and f"{path} line 3" in out
    assert "on_invalid is 'fail'" in out and out.rstrip().endswith("usable: no")


def test_quarantine_policy_within_its_limit_is_usable_and_reported_as_json(tmp_path, capsys):
    path = mixed(tmp_path)
    assert main(["validate", path, "--on-invalid", "quarantine", "--max-quarantined-fraction", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] and report["problems"] == []
    [source] = report["sources"]
    assert (source["read"], source["kept"], source["quarantined"]) == (4, 2, 2)
    assert source["rules"] == {"unreadable": 1, "not_blank": 1}
    assert main(["validate", path, "--on-invalid", "quarantine", "--max-quarantined-fraction", "0.4", "--json"]) == 1
    assert "more than data_checks.max_quarantined_fraction=0.4" in json.loads(capsys.readouterr().out)["problems"][0]


def test_eval_rows_copied_from_the_training_data_are_leakage(tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", ['{"prompt": "What is 2+2?", "completion": "4"}',
                                             '{"prompt": "Capital of France?", "completion": "Paris"}'])
    held_out = write(tmp_path / "eval.jsonl", ['{"prompt": "what is 2+2?", "completion": "4"}'])
    assert main(["validate", train, "--eval-data", held_out]) == 1
    out = capsys.readouterr().out
    assert "(leakage)" in out and f"{held_out} line 1" in out


def test_with_a_model_it_measures_tokens_and_fails_on_truncation(tiny_model, capsys):
    assert main(["validate", TRAIN, "--model", str(tiny_model), "--max-seq-len", "4096", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"]["train"]["rows"] == 40 and report["tokens"]["train"]["share_truncated"] == 0
    assert main(["validate", TRAIN, "--model", str(tiny_model), "--max-seq-len", "16",
                 "--max-truncated-fraction", "0.1"]) == 1
    assert "longer than training.max_seq_len=16 tokens" in capsys.readouterr().out


def test_missing_data_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere.jsonl")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err
