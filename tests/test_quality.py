"""Sources, format detection and the content checks (duplicates, chat roles, sizes, leakage)."""
import json

import numpy as np
import pandas as pd
import pytest

from tasks.config import DataSettings
from tasks.data.dataset import quarantine_records, scan_dataset, write_quarantine
from tasks.data.schemas import DatasetError
from tasks.data.validation import enforce, read_dataset, verdict_of

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rules_by_line(scan) -> dict[int, list[str]]:
    found = {}
    for problem in scan.problems:
        found.setdefault(problem.row, []).append(problem.rule)
    return found


def test_chat_rules_are_all_found_in_one_pass(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [system, *CHAT]},                                        # 1 fine
        {"messages": [CHAT[0], system, CHAT[1]]},                             # 2 system not first
        {"messages": [CHAT[1], CHAT[0]]},                                     # 3 order, ends with user
        {"messages": [CHAT[0], {"role": "bot", "content": "x"}]},             # 4 unknown role
        {"messages": [CHAT[0], {"role": "assistant", "content": " \n"}]},     # 5 blank content
        {"messages": []},                                                     # 6 empty
        {"messages": [system]},                                               # 7 only system
        {"messages": [*CHAT, CHAT[0], CHAT[1]]},                              # 8 fine, two turns
    ])
    found = rules_by_line(scan_dataset(path, checks=DataSettings(duplicates="allow")))
    assert found == {2: ["system_not_first", "role_order"], 3: ["role_order", "no_final_assistant"],
                     4: ["unknown_role", "no_final_assistant"], 5: ["not_blank"], 6: ["empty_conversation"],
                     7: ["no_final_assistant"]}


def test_exact_and_normalised_duplicates_keep_the_first_copy(tmp_path):
    rows = [{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "Other", "completion": "x"},
            {"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "  what IS   2+2?", "completion": "4 "}]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    scan = scan_dataset(path)
    assert [(p.row, p.rule, p.detail) for p in scan.problems] == [
        (3, "duplicate", "same as line 1"), (4, "near_duplicate", "same as line 1")]
    assert scan.accounting() == {"read": 4, "kept": 2, "quarantined": 2}
    assert scan_dataset(path, checks=DataSettings(duplicates="allow")).problems == []


def test_leakage_compares_with_the_training_rows(tmp_path):
    train = scan_dataset(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Capital of France?", "completion": "Paris"}]))
    held_out = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "capital of  France?", "completion": "Paris"},
                                                  {"prompt": "Capital of Spain?", "completion": "Madrid"}])
    scan = scan_dataset(held_out, reference=train.kept_normalised)
    assert [(p.row, p.rule) for p in scan.problems] == [(1, "leakage")]


def test_quarantine_file_has_every_bad_row_with_reasons_and_data(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{broken\n{"prompt": "c", "completion": ""}\n'
                     b'{"prompt": "d", "completion": "e"}\n')
    checks = DataSettings(on_invalid="quarantine", max_quarantined_fraction=0.5)
    scan = scan_dataset(str(path), checks=checks)
    enforce(verdict_of(scan), checks)  # half the rows bad is within max_quarantined_fraction=0.5
    assert scan.accounting() == {"read": 4, "kept": 2, "quarantined": 2}
    assert write_quarantine(quarantine_records(scan), tmp_path / "q.jsonl") == 2
    records = [json.loads(line) for line in open(tmp_path / "q.jsonl")]
    assert records == [
        {"file": str(path), "line": 2, "reasons": ["unreadable: invalid JSON (Expecting property name enclosed in "
                                                    "double quotes at column 2)"], "data": "{broken"},
        {"file": str(path), "line": 3, "reasons": ["not_blank completion: got ''"],
         "data": {"prompt": "c", "completion": ""}}]
    assert scan.kept.to_pylist() == [{"prompt": "a", "completion": "b"}, {"prompt": "d", "completion": "e"}]


def test_too_few_rows_fail(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.raises(DatasetError, match=r"2 usable row\(s\) of 2 read, fewer than data_checks.min_rows=5"):
        read_dataset(path, checks=DataSettings(min_rows=5))


def test_plain_text_format(tmp_path):
    dataset = read_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]))
    assert (dataset.data_format, dataset.conversations) == ("text", [[{"role": "assistant",
                                                                        "content": "Once upon a time."}]])
    assert dataset.format_evidence == "keys text in 1 of 1 sampled rows"


def test_a_folder_of_files_is_one_dataset_with_rows_named_per_file(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "a", "completion": "1"}])
    write_jsonl(folder / "b.jsonl", [{"prompt": "b", "completion": "2"}, {"prompt": "a", "completion": "1"}])
    scan = scan_dataset(str(folder))
    assert scan.accounting() == {"read": 3, "kept": 2, "quarantined": 1}
    assert (scan.problems[0].file, scan.problems[0].row) == (str(folder / "b.jsonl"), 2)
    assert scan.problems[0].detail == f"same as line 1 of {folder / 'a.jsonl'}"
    (folder / "c.csv").write_text("prompt,completion\nx,y\n")
    with pytest.raises(DatasetError, match="holds files of several types"):
        scan_dataset(str(folder))


def test_saved_hugging_face_dataset(tmp_path):
    import datasets

    rows = {"messages": [CHAT, [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    dataset = read_dataset(str(tmp_path / "hf"))
    assert dataset.data_format == "chat" and dataset.conversations == rows["messages"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DatasetError, match=r"saved DatasetDict with splits train; point data at one split folder"):
        read_dataset(str(tmp_path / "dict"))


def test_chat_parquet_with_any_field_order(tmp_path):
    reordered = [[{"content": m["content"], "role": m["role"]} for m in CHAT]]
    pd.DataFrame({"messages": reordered}).to_parquet(tmp_path / "c.parquet")
    assert read_dataset(str(tmp_path / "c.parquet")).conversations == [CHAT]


def test_forced_format_that_does_not_match_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError, match=r"column 'messages' is missing for the chat format \(columns found: "
                                           r"prompt, completion\)"):
        read_dataset(path, "chat")


def test_large_file_is_read_in_several_chunks_with_exact_line_numbers(tmp_path, monkeypatch):
    import tasks.data.reading

    monkeypatch.setattr(tasks.data.reading, "CHUNK_BYTES", 256)
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(100)]
    lines = [json.dumps(r) for r in rows]
    lines[57] = json.dumps({"prompt": "question 57", "completion": ""})
    lines.insert(30, "")  # a blank line shifts every later line number
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    scan = scan_dataset(str(tmp_path / "big.jsonl"))
    assert [(p.row, p.rule) for p in scan.problems] == [(59, "not_blank")]  # row 57 of the list, line 59
    assert scan.read == 100 and np.array_equal(scan.kept_rows, [r for r in range(1, 102) if r not in (31, 59)])
