"""Readers never let a raw exception out: seeded fuzz cases (tests/fuzz_readers.py runs 10,000+)."""
import gzip

import pytest
from fuzz_readers import KINDS, SUFFIXES, every_truncation, run, valid_bytes

from tasks.data.schemas import DatasetError
from tasks.data.validation import read_dataset


def test_every_fuzz_case_reads_or_is_refused_naming_the_file(tmp_path):
    outcomes = run(300, seed=20261201, root=tmp_path)  # AssertionError on any other exception
    assert sum(outcomes.values()) == 300
    assert {kind for kind, _, _ in outcomes} == set(KINDS) | {"mixed"}
    assert {outcome for _, _, outcome in outcomes} == {"rows", "refused"}


def test_a_file_cut_at_any_byte_reads_or_is_refused_naming_the_file(tmp_path):
    outcomes = every_truncation(tmp_path, step=4)  # every offset in tests/fuzz_readers.py; AssertionError if raw
    assert sum(outcomes.values()) == sum(len(range(0, len(valid_bytes(s)), 4)) + 1 for s in SUFFIXES)
    for suffix in SUFFIXES:
        assert outcomes[("every-cut", suffix, "refused")] >= 1 and outcomes[("every-cut", suffix, "rows")] >= 1


def test_a_compressed_file_without_its_suffix_is_named_as_such(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n'))
    with pytest.raises(DatasetError, match=r"train.jsonl: the file is gzip-compressed but named .jsonl"):
        read_dataset(str(path))


def test_rows_nested_too_deep_or_with_huge_numbers_are_named_by_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text('{"prompt": "ok", "completion": "x"}\n{"prompt": %s, "completion": "x"}\n'
                    '{"prompt": %s, "completion": "y"}\n' % (deep, "9" * 5000))
    with pytest.raises(DatasetError) as caught:
        read_dataset(str(path))
    assert "deep.jsonl line 2: cannot be parsed (RecursionError" in str(caught.value)
    assert "deep.jsonl line 3: cannot be parsed (ValueError" in str(caught.value)
