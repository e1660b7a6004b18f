"""Data files -> typed Arrow chunks with source row numbers, plus the rows that cannot be parsed.

JSONL is read in blocks cut at line ends and parsed by Arrow's JSON reader (the fast path). When a
block holds anything Arrow cannot take (broken JSON, a number where text belongs, invalid UTF-8),
that block alone is re-read line by line in Python so each broken row is named by line and field
(the precise path). CSV goes through Python's csv module (quoted fields with newlines and quotes),
JSON arrays through json, Parquet and `datasets` Arrow files through pyarrow batch by batch.
Pure: pyarrow, numpy.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from tasks.data.schemas import FORMATS, TEXT_FIELDS, DatasetError
from tasks.data.sources import SourceFile, open_seekable, open_stream

CHUNK_BYTES = 64 * 2**20  # JSONL block size: large enough for Arrow's threads, small for memory
BATCH_ROWS = 65_536  # rows per Parquet / Arrow batch
SAMPLE_ROWS = 200  # rows looked at to detect the format
SAMPLE_BYTES, MAX_SAMPLE_BYTES = 4 * 2**20, 256 * 2**20  # read for the sample; more only for a huge first row
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_SIGNATURES = {  # format -> the fields that identify it, checked in this order
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHORT_LINE = 64  # bytes: longer lines are never whitespace-only in practice, and are checked by the parser


def arrow_schema(data_format: str) -> pa.Schema:
    if data_format == "chat":
        return pa.schema([("messages", pa.list_(MESSAGE))])
    required, optional = TEXT_FIELDS[data_format]
    return pa.schema([(name, pa.string()) for name in required + optional])


@dataclass
class Problem:
    """One broken rule of one row."""
    file: str
    row: int
    rule: str
    field: str
    detail: str


@dataclass
class Chunk:
    """Parsed rows of one file: `table` rows are typed; rows that could not be parsed are in `problems`."""
    file: str
    table: pa.Table
    rows: np.ndarray  # source row number of each table row
    sizes: np.ndarray  # bytes of text of each table row (every field, or every message's content)
    problems: list[Problem] = field(default_factory=list)
    raw: dict[int, str] = field(default_factory=dict)  # unparsable row -> its text, for quarantine
    read: int = 0  # rows read: table rows + unparsable rows


def row_word(source: SourceFile) -> str:
    return "line" if source.suffix == "jsonl" else "row"


# ---- format detection -------------------------------------------------------------------------

COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
              b"PK\x03\x04": "zip"}  # magic bytes at the start of a compressed file
# Errors of the transport, not of the bytes: S3 and network failures stay what they are (retried as such).
TRANSPORT_MODULES = ("botocore", "boto3", "s3transfer", "urllib3")


@contextmanager
def reading(source: SourceFile):
    """Whatever a parser raises on bad bytes (Arrow, json, csv, a decoder, a deep nesting's RecursionError,
    a damaged Arrow header's MemoryError for a huge buffer) becomes a DatasetError naming the file: no
    reader lets a raw exception out (tests/fuzz_readers.py)."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as error:
        if type(error).__module__.split(".")[0] in TRANSPORT_MODULES:
            raise
        raise DatasetError(
            f"{source.uri}: cannot be read as a .{source.suffix} file ({type(error).__name__}: "
            f"{_excerpt(str(error), 120)}); check that the file is complete, uncompressed (decompress a .gz "
            f"first) and really {source.suffix.upper()}") from error


def detect_format(source: SourceFile, given: str) -> tuple[str, str]:
    """(format, evidence). Evidence says what was seen, so a wrong guess is easy to spot."""
    with reading(source):
        return _detect_format(source, given)


def _detect_format(source: SourceFile, given: str) -> tuple[str, str]:
    if source.size == 0:
        raise DatasetError(f"{source.uri}: the dataset has no rows (the file is empty, 0 bytes); "
                           "add at least one example")
    with open_stream(source) as stream:
        compression = next((name for magic, name in COMPRESSED.items() if stream.read(6).startswith(magic)), None)
    if compression:
        raise DatasetError(f"{source.uri}: the file is {compression}-compressed but named .{source.suffix}; "
                           f"decompress it first (the readers take uncompressed .jsonl, .json, .csv, .parquet, .arrow)")
    columns, sample = _sample_columns(source)
    if not sample:
        given = _unreadable_start(source, given)
    present = Counter(name for keys in sample for name in keys)
    found = ", ".join(present) or "none"  # in the order the file has them
    if not sample:
        return given, f"no readable row among the first {SAMPLE_ROWS}; format not detected"
    if given != "auto":
        missing = [f for f in _required(given) if f not in present]
        if missing and sample:
            raise DatasetError(f"{source.uri}: column {missing[0]!r} is missing for the {given} format "
                               f"(columns found: {found}); set data_format to the file's real format or "
                               f"rename the columns")
        return given, "given by data_format"
    votes = Counter(_format_of(keys) for keys in sample)
    votes.pop(None, None)
    if not votes and {"chosen", "rejected"} <= set(present):  # read by tasks/data/preference.py
        paired = sum("chosen" in keys and "rejected" in keys for keys in sample)
        return "preference", f"{columns} chosen, rejected in {paired} of {len(sample)} sampled rows"
    if not votes:
        expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in _SIGNATURES.items())
        raise DatasetError(f"{source.uri}: cannot tell the row format from the columns ({found}). "
                           f"Expected one of: {expected}. Rename the columns or set data_format.")
    chosen, count = votes.most_common(1)[0]
    evidence = f"{columns} {', '.join(_SIGNATURES[chosen])} in {count} of {len(sample)} sampled rows"
    others = [f"{name} in {n}" for name, n in votes.items() if name != chosen]
    return chosen, evidence + (f" (also {', '.join(others)}: mixed formats)" if others else "")


def _unreadable_start(source: SourceFile, given: str) -> str:
    """No row could be sampled: an empty dataset is an error; broken rows are reported by the full read."""
    with open_stream(source) as stream:
        start = stream.read(4 * 2**20)
    if not start.strip() or start.strip() == codecs.BOM_UTF8:
        raise DatasetError(f"{source.uri}: the dataset has no rows; add at least one example")
    return given if given != "auto" else "chat"  # any format: every row will be reported as unreadable


def _required(data_format: str) -> tuple[str, ...]:
    if data_format == "preference":
        return ("chosen", "rejected")
    return ("messages",) if data_format == "chat" else TEXT_FIELDS[data_format][0]


def _format_of(keys) -> str | None:
    for name, needed in _SIGNATURES.items():
        if set(needed) <= set(keys):
            return name
    return None


def _sample_columns(source: SourceFile) -> tuple[str, list[list[str]]]:
    """('columns' or 'keys', the field names of the first rows)."""
    if source.suffix in ("parquet", "arrow"):
        return "columns", [_table_schema(source).names] if source.size else []
    if source.suffix == "csv":
        with open_stream(source) as stream:
            header = next(csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace")), [])
        return "columns", [header] if header else []
    keys = []
    for _, record in _sample_records(source):
        if isinstance(record, dict):
            keys.append(list(record))
    return "keys", keys


def _sample_records(source: SourceFile):
    if source.suffix == "json":
        records = _load_json_array(source)
        return list(enumerate(records[:SAMPLE_ROWS], start=1))
    out = []
    with open_stream(source) as stream:
        block = stream.read(SAMPLE_BYTES)
        while b"\n" not in block[:-1] and len(block) < MAX_SAMPLE_BYTES:  # a huge first row: read all of it
            more = stream.read(SAMPLE_BYTES)
            if not more:
                break
            block += more
    for number, line in enumerate(block.split(b"\n"), start=1):
        if len(out) >= SAMPLE_ROWS:
            break
        try:
            out.append((number, json.loads(line.decode("utf-8-sig", errors="replace"))))
        except (ValueError, RecursionError):
            continue  # blank, cut off, broken or nested too deep: the full read reports it
    return out


# ---- reading ----------------------------------------------------------------------------------

def read_chunks(source: SourceFile, data_format: str) -> Iterator[Chunk]:
    """Every row of the file, chunk by chunk; nothing is skipped without a Problem saying why."""
    if data_format not in FORMATS:
        raise DatasetError(f"unknown data_format {data_format!r}; use one of {', '.join(FORMATS)}")
    reader = {"jsonl": _jsonl_chunks, "json": _json_chunks, "csv": _csv_chunks,
              "parquet": _columnar_chunks, "arrow": _columnar_chunks}[source.suffix]
    with reading(source):
        yield from reader(source, data_format)


def _jsonl_chunks(source: SourceFile, data_format: str) -> Iterator[Chunk]:
    first_line, carry = 1, b""
    with open_stream(source) as stream:
        while True:
            block = stream.read(CHUNK_BYTES)
            data = carry + block if carry else block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0 and block:
                carry = data  # one row longer than a block: keep reading until its line ends
                continue
            if data[:cut]:
                yield _jsonl_chunk(source, data[:cut], first_line, data_format)
                first_line += data.count(b"\n", 0, cut)
            carry = data[cut:]
            if not block:
                return


def _jsonl_chunk(source: SourceFile, data: bytes, first_line: int, data_format: str) -> Chunk:
    if first_line == 1 and data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise DatasetError(f"{source.uri} line 1: the file is UTF-16 encoded (byte-order mark); "
                           "re-encode it as UTF-8")
    if first_line == 1 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]  # Windows tools write one; it is not part of the data
    import pyarrow.compute as pc

    fast = _fast_jsonl(data, data_format)
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if fast is not None and fast.num_rows == lines:  # no blank line: row i is line first_line + i
        rows = np.arange(first_line, first_line + lines, dtype=np.int64)
        return Chunk(source.uri, fast, rows, _row_sizes(fast, pc), read=len(rows))
    starts, lengths, blank = _line_layout(data)
    rows = first_line + np.flatnonzero(~blank)
    if fast is not None and fast.num_rows == len(rows):
        return Chunk(source.uri, fast, rows, _row_sizes(fast, pc), read=len(rows))
    numbered = ((first_line + i, data[s:s + n]) for i, (s, n) in enumerate(zip(starts, lengths)) if not blank[i])
    return _records_chunk(source, _decoded_lines(numbered), data_format)


def _line_layout(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, length and blankness of every line, computed without a Python loop."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw == 10)
    if not len(ends) or ends[-1] != len(raw) - 1:
        ends = np.append(ends, len(raw))  # last line without a newline
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    blank = np.zeros(len(starts), dtype=bool)
    # Only short lines can be blank; looking at just those keeps this linear in lines, not bytes.
    for i in np.flatnonzero(lengths < SHORT_LINE):
        blank[i] = not data[starts[i]:ends[i]].strip()
    return starts, lengths, blank


def _fast_jsonl(data: bytes, data_format: str) -> pa.Table | None:
    """Arrow's parse of a clean block, or None when the block needs the precise path."""
    if not _is_utf8(data):  # Arrow's JSON reader does not check UTF-8 inside strings
        return None
    try:
        table = pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=len(data) + 1),
                                  parse_options=pa_json.ParseOptions(explicit_schema=arrow_schema(data_format),
                                                                     unexpected_field_behavior="ignore"))
    except pa.ArrowInvalid:
        return None
    return None if _has_foreign_rows(table, data_format) else table


def _is_utf8(data: bytes) -> bool:
    """Arrow's vectorised UTF-8 validation over the bytes, without making a Python str of them."""
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64).tobytes())
    try:
        pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)]).cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _has_foreign_rows(table: pa.Table, data_format: str) -> bool:
    """Rows missing every identifying field may be another format: the precise path says which."""
    import pyarrow.compute as pc

    absent = None
    for name in _required(data_format):
        column = pc.is_null(table.column(name))
        absent = column if absent is None else pc.and_(absent, column)
    return bool(pc.any(absent).as_py())


def _decoded_lines(lines) -> Iterator[tuple[int, object, int, str | None]]:
    """(row, parsed value or Problem-args, size, raw text) for each line."""
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield number, ("(row)", "not_utf8", f"not valid UTF-8 at byte {error.start} of the line "
                           f"(0x{raw[error.start]:02x}, Latin-1 '{raw[error.start:error.start + 1].decode('latin-1')}'?)"), \
                len(raw), raw.decode("utf-8", errors="backslashreplace")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            value = ("(row)", "unreadable", f"invalid JSON ({error.msg} at column {error.colno})")
        except (ValueError, RecursionError) as error:  # a 5,000-digit number, nesting deeper than Python's stack
            value = ("(row)", "unreadable", f"cannot be parsed ({type(error).__name__}: {str(error)[:80]})")
        yield number, value, len(raw), text


def _records_chunk(source: SourceFile, items, data_format: str) -> Chunk:
    """Python objects -> a typed chunk; rows whose structure is wrong become Problems."""
    good, rows, sizes, problems, raw = [], [], [], [], {}
    for number, value, size, text in items:
        problem = value if isinstance(value, tuple) else structure_problem(value, data_format)
        if problem is not None:
            field_name, rule, detail = problem
            problems.append(Problem(source.uri, number, rule, field_name, detail))
            raw[number] = text if len(text) <= 100_000 else text[:100_000] + "...(cut)"
            continue
        good.append(value)
        rows.append(number)
        sizes.append(size)
    import pyarrow.compute as pc

    names = arrow_schema(data_format).names
    table = pa.Table.from_pylist([{n: r.get(n) for n in names} for r in good], schema=arrow_schema(data_format))
    return Chunk(source.uri, table, np.array(rows, dtype=np.int64), _row_sizes(table, pc),
                 problems, raw, read=len(good) + len(problems))


def structure_problem(record, data_format: str) -> tuple[str, str, str] | None:
    """(field, rule, detail) when a row's shape cannot be typed; nulls are left to the schema checks."""
    if not isinstance(record, dict):
        return "(row)", "unreadable", f"expected a JSON object, got {type(record).__name__}"
    if not any(record.get(name) is not None for name in _required(data_format)):
        other = _format_of([k for k, v in record.items() if v is not None])
        if other and other != data_format:
            return ("(row)", "missing", f"this row is in the {other} format (keys {', '.join(record)}) but the "
                    f"file is {data_format}; use one format per file")
    if data_format != "chat":
        required, optional = TEXT_FIELDS[data_format]
        for name in required + optional:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                return name, "not_text", f"got {type(value).__name__} {_excerpt(value)}"
        return None
    messages = record.get("messages")
    if messages is not None and not isinstance(messages, list):
        return "messages", "bad_message", f"must be a list of messages, got {type(messages).__name__}"
    for i, message in enumerate(messages or []):
        if message is None:
            continue
        if not isinstance(message, dict):
            return f"messages[{i}]", "bad_message", f"got {type(message).__name__} {_excerpt(message)}"
        for key in ("role", "content"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                return f"messages[{i}].{key}", "bad_message", f"got {type(value).__name__} {_excerpt(value)}"
    return None


def _excerpt(value, width: int = 60) -> str:
    text = repr(value)
    return text[:width] + "..." if len(text) > width else text


def _load_json_array(source: SourceFile) -> list:
    with open_stream(source) as stream:
        data = stream.read()
    if not data.strip():
        return []
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(f"{source.uri} line {line}: not valid UTF-8 (byte {error.start}); "
                           "re-encode the file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{source.uri} line {error.lineno}: invalid JSON ({error.msg} at column "
                           f"{error.colno}); a .json dataset must be one array of objects") from None
    except (ValueError, RecursionError) as error:
        raise DatasetError(f"{source.uri}: cannot be parsed ({type(error).__name__}: {str(error)[:80]}); a .json "
                           "dataset must be one array of objects") from None
    if not isinstance(records, list):
        raise DatasetError(f"{source.uri}: a .json dataset must be a list of objects; "
                           "use .jsonl for one object per line")
    return records


def _json_chunks(source: SourceFile, data_format: str) -> Iterator[Chunk]:
    records = _load_json_array(source)
    for start in range(0, len(records), BATCH_ROWS):
        items = ((start + i + 1, r, len(json.dumps(r)), json.dumps(r))
                 for i, r in enumerate(records[start:start + BATCH_ROWS]))
        yield _records_chunk(source, items, data_format)


def _csv_chunks(source: SourceFile, data_format: str) -> Iterator[Chunk]:
    with open_stream(source) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, strict=True)
        try:
            header = next(reader, None)
            batch = []
            for item in _csv_rows(source, reader, header or []):
                batch.append(item)
                if len(batch) == BATCH_ROWS:
                    yield _records_chunk(source, batch, data_format)
                    batch = []
        except UnicodeDecodeError as error:
            raise DatasetError(f"{source.uri}: not valid UTF-8 near byte {error.start} of a read block; "
                               "re-encode the file as UTF-8") from None
        if batch:
            yield _records_chunk(source, batch, data_format)


def _csv_rows(source: SourceFile, reader, header: list[str]):
    number = 0
    while True:
        line_before = reader.line_num
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            number += 1
            yield number, ("(row)", "unreadable", f"broken CSV quoting starting on line {line_before + 1} "
                           f"({error}); a quote inside a quoted field is written as two quotes \"\""), 0, ""
            return  # the parser cannot find the next row reliably after broken quoting
        number += 1
        text = ",".join(values)
        if len(values) != len(header):
            yield number, ("(row)", "unreadable", f"{len(values)} field(s) on line {line_before + 1}, "
                           f"the header has {len(header)}; quote fields that contain commas"), len(text), text
            continue
        record = dict(zip(header, values))
        if "messages" in record:  # chat in CSV: the messages column holds JSON
            record["messages"] = _json_or_raw(record["messages"])
        yield number, record, len(text), text


def _json_or_raw(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # reported as not a list of messages


def _table_schema(source: SourceFile) -> pa.Schema:
    with open_seekable(source) as stream:
        if source.suffix == "arrow":
            return pa.ipc.open_stream(stream).schema
        import pyarrow.parquet as pq

        return pq.ParquetFile(stream).schema_arrow


def _columnar_chunks(source: SourceFile, data_format: str) -> Iterator[Chunk]:
    import pyarrow.compute as pc

    target = arrow_schema(data_format)
    with open_seekable(source) as stream:
        batches = _batches(source, stream, target)
        first_row = 1
        for batch in batches:
            try:  # Arrow trusts a file's bytes: a damaged one can hold invalid UTF-8 or offsets out of range
                batch.validate(full=True)
            except pa.ArrowInvalid as error:
                raise DatasetError(f"{source.uri} rows {first_row}-{first_row + batch.num_rows - 1}: the file is "
                                   f"damaged ({_excerpt(str(error), 120)}); write it again from the source data") \
                    from None
            table = _conform(source, pa.Table.from_batches([batch]), target, first_row)
            rows = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
            sizes = _row_sizes(table, pc)
            first_row += table.num_rows
            yield Chunk(source.uri, table, rows, sizes, read=table.num_rows)


def _batches(source: SourceFile, stream, target: pa.Schema):
    if source.suffix == "arrow":
        return iter(pa.ipc.open_stream(stream))
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(stream)
    present = [name for name in target.names if name in parquet.schema_arrow.names]
    return parquet.iter_batches(batch_size=BATCH_ROWS, columns=present)


def _conform(source: SourceFile, table: pa.Table, target: pa.Schema, first_row: int) -> pa.Table:
    """Add absent optional columns as nulls; a column of the wrong type is a file-level error."""
    columns = []
    for target_field in target:
        if target_field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, target_field.type))
            continue
        column = table.column(target_field.name)
        if column.type != target_field.type:
            try:
                column = column.cast(target_field.type, safe=True) if _castable(column.type) else None
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                column = None
            if column is None:
                raise DatasetError(
                    f"{source.uri} rows {first_row}-{first_row + table.num_rows - 1}: column {target_field.name!r} "
                    f"has type {table.column(target_field.name).type}, expected {target_field.type}; "
                    f"write it as text (e.g. df[{target_field.name!r}] = df[{target_field.name!r}].astype(str))")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=target)


def _castable(arrow_type: pa.DataType) -> bool:
    """Only representations of the same thing: large strings, string views, nested variants of them."""
    text = str(arrow_type)
    return "int" not in text and "float" not in text and "double" not in text and "bool" not in text


def _row_sizes(table: pa.Table, pc) -> np.ndarray:
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_string(column.type):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy()
        else:  # chat: the contents of every message
            flat = pc.list_flatten(column)
            lengths = pc.fill_null(pc.binary_length(pc.struct_field(flat, "content")), 0).to_numpy()
            parents = pc.list_parent_indices(column).to_numpy()
            sizes += np.bincount(parents, weights=lengths, minlength=table.num_rows).astype(np.int64)
    return sizes
