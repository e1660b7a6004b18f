"""Checks on parsed chunks: per-row rules (pandera on vectorised facts), duplicates and leakage.

Per-row facts are computed with Arrow kernels and numpy, never a Python loop over rows, so the
checks keep up with the reader. Duplicates are found by 64-bit hashes of each row's text (exact) and
of its text ignoring ASCII case and whitespace (normalised); only the hashes are kept, so memory
stays flat however large the file. Pure: pyarrow, numpy, pandas, pandera.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.reading import Chunk, Problem
from tasks.data.schemas import BYTES, ROLES, TEXT_FIELDS, conversation_problem, failing_rows

MAX_DETAIL = 80  # characters of a value shown in a problem's excerpt


@dataclass
class CheckedChunk:
    problems: list[Problem]  # every broken rule of every row of the chunk
    ok: np.ndarray  # rows of chunk.table that broke no rule
    exact: np.ndarray  # uint64 hash of each ok row's text
    normalised: np.ndarray  # uint64 hash of each ok row's normalised text
    bad_values: dict[int, dict]  # row number -> its values, for rows that broke a rule


def check_chunk(chunk: Chunk, data_format: str, max_row_bytes: int, word: str) -> CheckedChunk:
    table = chunk.table
    facts = facts_frame(table, data_format, chunk.sizes)
    failures = failing_rows(facts, data_format, max_row_bytes)
    ok = np.ones(table.num_rows, dtype=bool)
    ok[failures["position"].to_numpy()] = False
    bad_positions = np.flatnonzero(~ok)
    bad_values = dict(zip(chunk.rows[bad_positions].tolist(), table.take(bad_positions).to_pylist()))
    problems = list(chunk.problems)
    for position, rule, field in failures.itertuples(index=False):
        row = int(chunk.rows[position])
        problems.append(Problem(chunk.file, row, rule, field,
                                _detail(rule, field, bad_values[row], int(chunk.sizes[position]), max_row_bytes)))
    kept = table.filter(pa.array(ok)) if len(bad_positions) else table
    exact, normalised = row_hashes(kept, data_format)
    return CheckedChunk(problems, ok, exact, normalised, bad_values)


def facts_frame(table: pa.Table, data_format: str, sizes: np.ndarray) -> pd.DataFrame:
    """One row per data row: what the pandera schema of `data_format` checks."""
    if data_format == "chat":
        facts = pd.DataFrame(_chat_facts(table.column("messages").combine_chunks()))
    else:
        required, optional = TEXT_FIELDS[data_format]
        facts = table.select(list(required + optional)).to_pandas()
    facts[BYTES] = sizes
    return facts


def _chat_facts(messages: pa.ListArray) -> dict[str, np.ndarray]:
    """Per conversation: message count and how many messages break each chat rule."""
    n = len(messages)
    counts = pc.list_value_length(messages).to_numpy(zero_copy_only=False).astype(float)  # NaN: null list
    lengths = np.nan_to_num(counts).astype(np.int64)
    start = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    flat = pc.list_flatten(messages)
    parents = pc.list_parent_indices(messages).to_numpy()
    role, content = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    code = pc.fill_null(pc.index_in(role, value_set=pa.array(ROLES)), -1).to_numpy()  # system 0, user 1, ...
    null = (pc.is_null(flat).to_numpy(zero_copy_only=False) | pc.is_null(role).to_numpy(zero_copy_only=False)
            | pc.is_null(content).to_numpy(zero_copy_only=False))
    blank = pc.fill_null(pc.match_substring_regex(content, r"^\s*$"), False).to_numpy(zero_copy_only=False)
    position = np.arange(len(flat)) - start[parents]
    has_system = np.zeros(n, dtype=bool)
    nonempty = lengths > 0
    has_system[nonempty] = code[start[nonempty]] == 0
    turn = position - has_system[parents]
    expected = np.where(turn % 2 == 0, 1, 2)  # user on even turns, assistant on odd
    last_code = np.full(n, -1)
    last_code[nonempty] = code[start[nonempty] + lengths[nonempty] - 1]

    def per_row(flags: np.ndarray) -> np.ndarray:
        return np.bincount(parents, weights=flags, minlength=n).astype(np.int64)

    return {
        "messages": counts,
        "null_in_message": per_row(null),
        "unknown_role": per_row((code == -1) & ~null),
        "not_blank": per_row(blank & ~null),
        "system_not_first": per_row((code == 0) & (position > 0)),
        "role_order": per_row((code >= 1) & (code != expected)),
        "no_final_assistant": (nonempty & (last_code != 2)).astype(np.int64),
    }


def row_keys(table: pa.Table, data_format: str) -> pa.Array:
    """Each row's full text as one string (fields or role+content of each message, with separators)."""
    if data_format != "chat":
        required, optional = TEXT_FIELDS[data_format]
        columns = [pc.fill_null(table.column(name), "") for name in required + optional]
        return pc.binary_join_element_wise(*columns, "\x1f").combine_chunks() if len(columns) > 1 else \
            columns[0].combine_chunks()
    messages = table.column("messages").combine_chunks()
    flat = pc.list_flatten(messages)
    pieces = pc.binary_join_element_wise(pc.fill_null(pc.struct_field(flat, "role"), ""),
                                         pc.fill_null(pc.struct_field(flat, "content"), ""), "\x1e")
    lengths = pc.fill_null(pc.list_value_length(messages), 0).to_numpy()
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
    return pc.binary_join(pa.ListArray.from_arrays(offsets, pieces), "\x1d")


WHITESPACE = b" \t\n\r"


def row_hashes(table: pa.Table, data_format: str) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of each row's text: as written (exact), and ignoring ASCII case and whitespace (normalised).

    One loop over slices of Arrow's string buffers, no Python str objects. The exact hash is Python's
    own (fast, but seeded per process: it is only compared within one scan); the normalised one is a
    stable blake2b digest, because an eval set's leakage check compares it with hashes cached by
    another process.
    """
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    keys = row_keys(table, data_format)
    data, offsets = _string_buffer(keys)
    lowered, lowered_offsets = _string_buffer(pc.ascii_lower(keys))  # same lengths: ASCII only
    exact, normalised = np.empty(len(keys), dtype=np.uint64), np.empty(len(keys), dtype=np.uint64)
    digest = hashlib.blake2b
    for i, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        exact[i] = hash(data[start:end].tobytes()) & 0xFFFFFFFFFFFFFFFF
        squeezed = lowered[start:end].tobytes().translate(None, WHITESPACE)
        normalised[i] = int.from_bytes(digest(squeezed, digest_size=8).digest(), "little")
    return exact, normalised


def _string_buffer(strings: pa.Array) -> tuple[memoryview, np.ndarray]:
    """The bytes of an Arrow string array and its row offsets, rebased to start at 0."""
    strings = strings.cast(pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)[strings.offset:strings.offset + len(strings) + 1]
    base = int(offsets[0])
    data = strings.buffers()[2]
    return memoryview(data)[base:int(offsets[-1])] if data is not None else memoryview(b""), offsets - base


def first_copies(hashes: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row with the same hash (itself when it is the first)."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def _detail(rule: str, field: str, value: dict, size: int, max_row_bytes: int) -> str:
    if rule == "oversized":
        return f"{size:,} bytes, the limit is {max_row_bytes:,}"
    if rule == "no_final_assistant":
        last = (value.get("messages") or [{}])[-1] or {}
        return f"the last message is from {last.get('role')!r}"
    if field == "messages" and rule != "missing":
        return conversation_problem(value.get("messages")) or rule
    if rule == "missing":
        return "value is missing"
    return f"got {excerpt(value.get(field))}"


def excerpt(value, width: int = MAX_DETAIL) -> str:
    text = repr(value)
    return text[:width] + "..." if len(text) > width else text
