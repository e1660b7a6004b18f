"""A corpus of broken files: each gives one clear DatasetError naming the file, the row and the field.

DatasetError is what the ingest task raises and the flow shows; any other exception here would reach
the user as a raw traceback, so `pytest.raises(DatasetError)` is the point of every case.
"""
import codecs
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import DataSettings
from tasks.data.schemas import DatasetError
from tasks.data.validation import read_dataset

PAIR = {"prompt": "What is 2+2?", "completion": "4"}
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def error_for(path, **checks) -> str:
    with pytest.raises(DatasetError) as caught:
        read_dataset(str(path), checks=DataSettings(**checks))
    return str(caught.value)


def test_truncated_file_names_the_cut_line(tmp_path):
    path = tmp_path / "truncated.jsonl"
    path.write_bytes(lines(PAIR, {**PAIR, "prompt": "q2"}) + b'{"prompt": "What is 3+3?", "compl')
    text = error_for(path)
    assert f"{path} line 3: invalid JSON (Unterminated string" in text
    assert "cannot be parsed (unreadable) in 1 row(s)" in text and "1 of 3 row(s)" in text


def test_utf8_bom_is_read_and_utf16_is_refused(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + lines(PAIR, {**PAIR, "prompt": "q2"}))
    dataset = read_dataset(str(path))
    assert dataset.rows == [1, 2] and dataset.conversations[0][0]["content"] == "What is 2+2?"
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(json.dumps(PAIR).encode("utf-16"))
    assert f"{utf16} line 1: the file is UTF-16 encoded" in error_for(utf16)


def test_latin1_bytes_name_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(lines(PAIR, '{"prompt": "caf\xe9", "completion": "ok"}'.encode("latin-1")))
    text = error_for(path)
    assert f"{path} line 2: not valid UTF-8 at byte 15 of the line (0xe9, Latin-1 'é'?)" in text
    assert "re-encode the file as UTF-8" in text


def test_mixed_schemas_in_one_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(lines({"instruction": "Add 2 and 2", "output": "4"}, {"instruction": "Add 1 and 1", "output": "2"},
                           PAIR, {"instruction": "Add 3", "output": "3"}))
    text = error_for(path)
    assert "instruction format (keys instruction, output in 3 of 4 sampled rows (also prompt_completion in 1" in text
    assert f"{path} line 3: this row is in the prompt_completion format (keys prompt, completion)" in text


def test_nulls_in_nested_messages(tmp_path):
    path = tmp_path / "nulls.jsonl"
    path.write_bytes(lines({"messages": CHAT}, {"messages": [{"role": "user", "content": None}, CHAT[1]]},
                           {"messages": [None, CHAT[1]]}, {"messages": None}))
    text = error_for(path)
    assert "column 'messages', a message, its role or its content is null (null_in_message) in 2 row(s)" in text
    assert f"{path} line 2: message 0 must be an object with a 'role' and a 'content'" in text
    assert f"{path} line 3: message 0 must be an object" in text
    assert "column 'messages', value missing (missing) in 1 row(s)" in text and f"{path} line 4: value is missing" in text


def test_wrong_type_inside_a_message_names_the_nested_field(tmp_path):
    path = tmp_path / "types.jsonl"
    path.write_bytes(lines({"messages": CHAT}, {"messages": [CHAT[0], {"role": "assistant", "content": 42}]}))
    assert f"{path} line 2 (messages[1].content): got int 42" in error_for(path)


def test_a_10_mb_single_row_is_oversized(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_bytes(lines(PAIR, {"prompt": "x" * 10_000_000, "completion": "y"}))
    text = error_for(path)
    assert f"{path} line 2: 10,000,0" in text and "the limit is 1,000,000" in text and "(oversized)" in text
    assert len(read_dataset(str(path), checks=DataSettings(max_row_bytes=20_000_000))) == 2
    first = tmp_path / "huge-first.jsonl"  # a first row longer than the format-detection sample
    first.write_bytes(lines({"prompt": "x" * 10_000_000, "completion": "y"}, PAIR))
    assert "prompt_completion format (keys prompt, completion in 2 of 2 sampled rows)" in error_for(first)


def test_csv_with_broken_quoting(tmp_path):
    path = tmp_path / "quotes.csv"
    path.write_text('prompt,completion\n"What, exactly?","A ""quoted"" answer\nover two lines"\n'
                    '"unclosed,answer\nq,a\n')
    text = error_for(path)
    assert f"{path} row 2: broken CSV quoting starting on line 4" in text
    path.write_text('prompt,completion\n"What, exactly?","A ""quoted"" answer\nover two lines"\nq,a,extra\n')
    assert f"{path} row 2: 3 field(s) on line 4, the header has 2" in error_for(path)
    path.write_text('prompt,completion\n"What, exactly?","A ""quoted"" answer\nover two lines"\n')
    assert read_dataset(str(path)).conversations[0][1]["content"] == 'A "quoted" answer\nover two lines'


def test_parquet_with_wrong_column_types(tmp_path):
    path = tmp_path / "types.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1, 2]}), path)
    text = error_for(path)
    assert f"{path} rows 1-2: column 'completion' has type int64, expected string" in text
    assert "astype(str)" in text


def test_empty_file_and_header_only(tmp_path):
    for name in ("empty.jsonl", "empty.csv", "empty.parquet"):
        (tmp_path / name).write_bytes(b"")
        assert f"{tmp_path / name}: the dataset has no rows (the file is empty, 0 bytes)" in error_for(tmp_path / name)
    header = tmp_path / "header.csv"
    header.write_text("prompt,completion\n")
    assert f"{header}: the dataset has no rows (an empty file, or a header without rows)" in error_for(header)
    parquet = tmp_path / "no-rows.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "completion": pd.Series([], dtype=str)}).to_parquet(parquet)
    assert "the dataset has no rows" in error_for(parquet)


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "c" "completion": "d"}\n]')
    assert f"{path} line 3: invalid JSON (Expecting ',' delimiter" in error_for(path)
    path.write_text('{"prompt": "a"}')
    assert "must be a list of objects" in error_for(path)


def test_every_broken_line_is_reported_at_once(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(lines(*[b"{oops" if i % 3 == 0 else {**PAIR, "prompt": f"q{i}"} for i in range(30)]))
    text = error_for(path)
    assert "in 10 of 30 row(s)" in text and "... and 5 more" in text
