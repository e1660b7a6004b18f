"""Untrusted data is bounded: a file over data_checks.max_file_bytes is refused from its size alone,
and a dataset over data_checks.max_rows stops being read."""
import json

import pytest

from tasks.config import DataSettings
from tasks.data.dataset import scan_dataset
from tasks.data.schemas import DatasetError
from tasks.data.sources import list_source_files


def write_rows(path, count):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_file_over_max_file_bytes_is_refused_before_it_is_read(tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_bytes(b"\xff\x00 not json at all " * 100)  # reading it would fail differently
    with pytest.raises(DatasetError) as refused:
        scan_dataset(str(data), checks=DataSettings(max_file_bytes=1000))
    message = str(refused.value)
    assert str(data) in message and "1,900 bytes" in message and "data_checks.max_file_bytes=1,000" in message


def test_a_file_within_max_file_bytes_is_read(tmp_path):
    data = write_rows(tmp_path / "ok.jsonl", 3)
    assert scan_dataset(str(data), checks=DataSettings(max_file_bytes=data.stat().st_size)).read == 3


@pytest.mark.integration
def test_an_s3_object_over_max_file_bytes_is_refused_from_its_listing(empty_bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=empty_bucket, Key="data/a.jsonl", Body=b"x" * 10)
    boto3.client("s3").put_object(Bucket=empty_bucket, Key="data/b.jsonl", Body=b"x" * 5000)
    with pytest.raises(DatasetError, match=r"s3://finetune-test/data/b.jsonl: 5,000 bytes, more than"):
        list_source_files(f"s3://{empty_bucket}/data/", max_file_bytes=4096)
    with pytest.raises(DatasetError, match="5,000 bytes"):
        list_source_files(f"s3://{empty_bucket}/data/b.jsonl", max_file_bytes=4096)


def test_a_dataset_over_max_rows_fails_with_the_limit(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    with pytest.raises(DatasetError) as refused:
        scan_dataset(str(data), checks=DataSettings(max_rows=10))
    assert str(data) in str(refused.value) and "more than data_checks.max_rows=10 rows" in str(refused.value)
    assert scan_dataset(str(data), checks=DataSettings(max_rows=12)).read == 12


def test_max_rows_counts_every_file_of_a_folder(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_rows(folder / "a.jsonl", 6)
    write_rows(folder / "b.jsonl", 6)
    with pytest.raises(DatasetError, match=r"max_rows=10 rows \(passed in .*b.jsonl\)"):
        scan_dataset(str(folder) + "/", checks=DataSettings(max_rows=10))


def test_a_cached_verdict_over_max_rows_is_refused_too():
    from tasks.data.validation import Verdict, enforce

    verdict = Verdict(source="s3://b/data.jsonl", sha256="0" * 64, data_format="chat", format_evidence="messages",
                      row_word="line", read=20, kept=20, rule_counts={}, report="", quarantine=[], kept_hashes=b"")
    with pytest.raises(DatasetError, match="s3://b/data.jsonl: more than data_checks.max_rows=10"):
        enforce(verdict, DataSettings(max_rows=10))
