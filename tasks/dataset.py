"""Reading a dataset file, detecting its row format, and turning rows into conversations.

Every row format becomes the same thing: a list of {role, content} messages ending with the
assistant's answer, which is what the model learns. Pure: pandas, pandera, boto3 (lazily).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tasks.schemas import ROW, DatasetError, validate_rows
from tasks.storage import read_bytes

Conversation = list[dict]
FORMAT_COLUMNS = {  # format -> the columns that identify it (checked in this order)
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
MAX_PARSE_ERRORS = 10


@dataclass
class Dataset:
    source: str
    sha256: str
    data_format: str
    format_evidence: str
    conversations: list[Conversation] = field(repr=False)
    rows: list[int] = field(repr=False)  # source row number of each conversation

    def __len__(self) -> int:
        return len(self.conversations)


def read_dataset(uri: str, data_format: str = "auto") -> Dataset:
    """Load, validate and normalise one dataset file; raise DatasetError naming file, row and column."""
    raw = read_bytes(uri)
    frame, row_word = parse_table(raw, uri)
    if frame.empty:
        raise DatasetError(f"{uri}: the dataset has no rows; add at least one example")
    if data_format == "auto":
        data_format, evidence = detect_format(list(frame.columns), uri)
    else:
        evidence = "given by data_format"
    validate_rows(frame, data_format, uri, row_word)
    return Dataset(
        source=uri,
        sha256=hashlib.sha256(raw).hexdigest(),
        data_format=data_format,
        format_evidence=evidence,
        conversations=[to_conversation(row, data_format) for row in frame.to_dict("records")],
        rows=frame[ROW].astype(int).tolist(),
    )


def parse_table(raw: bytes, uri: str) -> tuple[pd.DataFrame, str]:
    """Bytes of a .jsonl/.json/.csv/.parquet file -> a frame with a 1-based `_row` column."""
    try:
        return _parse(raw, uri)
    except DatasetError:
        raise
    except Exception as error:  # pyarrow, the CSV parser, json: name the file, keep their detail
        raise DatasetError(f"{uri}: cannot be read as {uri.rsplit('.', 1)[-1]} ({type(error).__name__}: {error})") from error


def _parse(raw: bytes, uri: str) -> tuple[pd.DataFrame, str]:
    suffix = uri.lower().rsplit(".", 1)[-1]
    if suffix == "parquet":
        frame = pd.read_parquet(io.BytesIO(raw))
        return _numbered(frame, start=1), "row"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DatasetError(f"{uri} line {line}: not valid UTF-8 (byte {error.start}); re-encode the file as UTF-8") from None
    if suffix == "csv":
        # Every field as text; empty fields stay "" so validation reports them instead of NaN surprises.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        if "messages" in frame.columns:
            frame["messages"] = frame["messages"].map(_json_or_raw)
        return _numbered(frame, start=1), "row"
    if suffix == "json":
        records = json.loads(text)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DatasetError(f"{uri}: a .json dataset must be a list of objects; use .jsonl for one object per line")
        return _numbered(pd.DataFrame.from_records(records), start=1), "row"
    return _parse_jsonl(text, uri), "line"


def _parse_jsonl(text: str, uri: str) -> pd.DataFrame:
    records, numbers, errors = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a blank line holds no row
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            errors.append(f"{uri} line {number}: invalid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            errors.append(f"{uri} line {number}: expected a JSON object, got {type(record).__name__}")
            continue
        records.append(record)
        numbers.append(number)
    if errors:
        shown = errors[:MAX_PARSE_ERRORS]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DatasetError(f"{len(errors)} unreadable line(s); fix or remove them:\n" + "\n".join(shown) + more)
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    frame[ROW] = numbers
    return frame


def _numbered(frame: pd.DataFrame, start: int) -> pd.DataFrame:
    frame = frame.reset_index(drop=True)
    if "messages" in frame.columns:  # parquet gives numpy arrays of structs
        frame["messages"] = frame["messages"].map(lambda v: list(v) if isinstance(v, np.ndarray) else v)
    frame[ROW] = range(start, start + len(frame))
    return frame


def _json_or_raw(value: str):
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return value  # validation reports it as not a conversation


def detect_format(columns: list[str], source: str) -> tuple[str, str]:
    present = set(columns)
    for data_format, needed in FORMAT_COLUMNS.items():
        if present.issuperset(needed):
            return data_format, f"columns {', '.join(needed)}"
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    found = ", ".join(c for c in columns if c != ROW) or "none"
    raise DatasetError(
        f"{source}: cannot tell the row format from the columns ({found}). "
        f"Expected one of: {expected}. Rename the columns or set data_format."
    )


def to_conversation(row: dict, data_format: str) -> Conversation:
    if data_format == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if data_format == "instruction":
        extra = row.get("input")
        prompt = row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def split_dataset(dataset: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic train/eval split; both sides keep their source row numbers."""
    n = len(dataset)
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise DatasetError(
            f"{dataset.source}: {n} row(s) cannot be split into train and eval; "
            "add rows or give eval_data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    return _subset(dataset, train_idx), _subset(dataset, eval_idx)


def _subset(dataset: Dataset, indices: list[int]) -> Dataset:
    return Dataset(
        source=dataset.source, sha256=dataset.sha256, data_format=dataset.data_format,
        format_evidence=dataset.format_evidence,
        conversations=[dataset.conversations[i] for i in indices],
        rows=[dataset.rows[i] for i in indices],
    )


def write_conversations(dataset: Dataset, path) -> None:
    """Save a split as JSONL: one {"row", "messages"} object per line, row = source row number."""
    with open(path, "w", encoding="utf-8") as out:
        for row, messages in zip(dataset.rows, dataset.conversations):
            out.write(json.dumps({"row": row, "messages": messages}, ensure_ascii=False) + "\n")


def read_conversations(path) -> tuple[list[int], list[Conversation]]:
    """A split written by write_conversations: (source row numbers, conversations)."""
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r["row"] for r in records], [r["messages"] for r in records]
