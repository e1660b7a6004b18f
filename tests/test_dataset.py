import json

import pandas as pd
import pytest

from tasks.data.dataset import split_dataset
from tasks.data.schemas import DatasetError
from tasks.data.validation import read_dataset
from tasks.store.objects import StorageNotFoundError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_file_type_reads_the_same_rows(tmp_path, suffix):
    rows = [{"instruction": f"Say {i}", "input": "" if i % 2 else "context", "output": f"{i}"} for i in range(5)]
    path = tmp_path / f"data.{suffix}"
    frame = pd.DataFrame(rows)
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "json": lambda: frame.to_json(path, orient="records"),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[suffix]()
    dataset = read_dataset(str(path))
    assert dataset.data_format == "instruction"
    assert dataset.rows == [1, 2, 3, 4, 5]
    assert dataset.conversations[0] == [{"role": "user", "content": "Say 0\n\ncontext"},
                                        {"role": "assistant", "content": "0"}]
    assert dataset.conversations[1][0]["content"] == "Say 1"


def test_formats_are_detected_and_normalised(tmp_path):
    chat = read_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    assert (chat.data_format, chat.conversations[0]) == ("chat", CHAT)
    pc = read_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "completion": "4"}]))
    assert pc.data_format == "prompt_completion"
    assert pc.conversations[0][-1] == {"role": "assistant", "content": "4"}


def test_chat_in_csv_and_parquet(tmp_path):
    pd.DataFrame({"messages": [json.dumps(CHAT)]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"messages": [CHAT]}).to_parquet(tmp_path / "c.parquet")
    for name in ("c.csv", "c.parquet"):
        assert read_dataset(str(tmp_path / name)).conversations == [CHAT]


def test_bad_rows_are_all_reported_with_file_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "  ", "output": "x"},
        {"instruction": "no output"},
        {"instruction": "number", "output": 7},
    ])
    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    text = str(caught.value)
    assert f"{path} line 2" in text and "'instruction'" in text and "empty or only whitespace" in text
    assert f"{path} line 3" in text and "value missing" in text
    assert f"{path} line 4" in text and "not text" in text
    assert "3 problem(s) in 3 of 4 row(s)" in text


def test_chat_rules_explain_the_problem(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}]},
        {"messages": [{"role": "bot", "content": "a"}]},
    ])
    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    text = str(caught.value)
    assert "line 2: roles must alternate" in text
    assert "line 3: the last message is from 'user'" in text
    assert "line 4: message 0 has role 'bot'" in text


def test_unreadable_json_lines_are_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n[1, 2]\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl line 2: invalid JSON.*\n.*line 3: expected a JSON object"):
        read_dataset(str(path))


def test_wrong_columns_say_what_was_found_and_expected(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DatasetError, match=r"qa.csv: cannot tell the row format from the columns \(question, answer\)"):
        read_dataset(str(path))
    with pytest.raises(DatasetError, match=r"(?s)qa.csv.*column 'messages' is missing"):
        read_dataset(str(path), "chat")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty.jsonl: the dataset has no rows"):
        read_dataset(str(tmp_path / "empty.jsonl"))
    with pytest.raises(StorageNotFoundError, match="nowhere.jsonl: file not found"):
        read_dataset(str(tmp_path / "nowhere.jsonl"))


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.jsonl line 1: not valid UTF-8 at byte 15 of the line \(0xe9"):
        read_dataset(str(path))


def test_split_is_deterministic_and_keeps_every_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    dataset = read_dataset(path)
    train, held_out = split_dataset(dataset, 0.25, seed=3)
    again_train, again_eval = split_dataset(dataset, 0.25, seed=3)
    assert (train.rows, held_out.rows) == (again_train.rows, again_eval.rows)
    assert len(held_out) == 5 and sorted(train.rows + held_out.rows) == list(range(1, 21))
    with pytest.raises(DatasetError, match="cannot be split"):
        split_dataset(read_dataset(write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "completion": "a"}])), 0.5, 0)


@pytest.mark.integration
def test_reads_from_s3(bucket, tmp_path):
    import boto3

    body = json.dumps({"prompt": "q", "completion": "a"}) + "\n"
    boto3.client("s3").put_object(Bucket=bucket, Key="data/train.jsonl", Body=body.encode())
    dataset = read_dataset(f"s3://{bucket}/data/train.jsonl")
    assert dataset.conversations[0][-1]["content"] == "a"
    with pytest.raises(StorageNotFoundError, match="NoSuchKey"):
        read_dataset(f"s3://{bucket}/data/missing.jsonl")


@pytest.mark.integration
def test_reads_an_s3_prefix_streamed_and_names_each_object(bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="shards/part-0.jsonl", Body=b'{"prompt": "q1", "completion": "a1"}\n')
    client.put_object(Bucket=bucket, Key="shards/part-1.jsonl",
                      Body=b'{"prompt": "q2", "completion": "a2"}\n{"prompt": "q3", "completion": " "}\n')
    client.put_object(Bucket=bucket, Key="shards/README.md", Body=b"not data")
    with pytest.raises(DatasetError, match=rf"s3://{bucket}/shards/part-1.jsonl line 2: got ' '"):
        read_dataset(f"s3://{bucket}/shards/")
    pd.DataFrame({"prompt": ["p"], "completion": ["c"]}).to_parquet(tmp_path / "data.parquet")
    client.upload_file(str(tmp_path / "data.parquet"), bucket, "pq/data.parquet")
    assert read_dataset(f"s3://{bucket}/pq/").conversations[0][1]["content"] == "c"
