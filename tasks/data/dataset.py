"""Reading a dataset, checking every row, and turning the usable rows into conversations.

Every row format becomes the same thing: a list of {role, content} messages ending with the
assistant's answer, which is what the model learns. Each file is streamed chunk by chunk
(tasks.data.reading), every chunk is checked (tasks.data.quality), and every row ends up either kept or
quarantined with its reasons: `kept + quarantined = read` is checked, so nothing is dropped
silently. Pure: pyarrow, pandas, pandera, boto3 (lazily).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.data.quality import check_chunk, first_copies
from tasks.data.reading import Problem, detect_format, read_chunks, row_word
from tasks.data.schemas import RULES, DatasetError
from tasks.data.settings import DataSettings
from tasks.data.sources import SourceFile, list_source_files, open_stream

Conversation = list[dict]
MAX_EXAMPLES_PER_RULE = 5


@dataclass
class Scan:
    """The verdict on every row of a dataset: problems, quarantined rows, and the kept rows."""
    source: str
    files: list[SourceFile]
    data_format: str
    format_evidence: str
    word: str  # "line" (JSONL) or "row"
    read: int
    problems: list[Problem]
    bad_values: dict[tuple[str, int], object] = field(repr=False)
    kept: pa.Table | None = field(repr=False)  # None when scanned with collect=False
    kept_rows: np.ndarray = field(repr=False)
    kept_files: np.ndarray = field(repr=False)
    kept_normalised: np.ndarray = field(repr=False)  # hashes: the leakage reference for an eval set

    @property
    def bad_rows(self) -> int:
        return len({(p.file, p.row) for p in self.problems})

    def accounting(self) -> dict:
        counts = {"read": self.read, "kept": len(self.kept_rows), "quarantined": self.bad_rows}
        if counts["kept"] + counts["quarantined"] != counts["read"]:
            raise RuntimeError(f"{self.source}: row accounting does not add up ({counts}); this is a bug, "
                               "please report it with the data file")
        return counts

    def rule_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for problem in self.problems:
            counts[problem.rule] += 1
        return dict(counts)


def scan_dataset(uri: str, data_format: str = "auto", checks: DataSettings | None = None,
                 reference: np.ndarray | None = None, collect: bool = True) -> Scan:
    """Read and check every row of `uri`; `reference` holds the training rows' hashes (leakage)."""
    checks = checks or DataSettings()
    files = list_source_files(uri, checks.max_file_bytes)
    data_format, evidence = detect_format(files[0], data_format)
    for other in files[1:]:
        detect_format(other, data_format)  # every file must have the format's columns
    word = row_word(files[0])
    read, problems, bad_values = 0, [], {}
    tables, rows, file_ids, exact, normalised = [], [], [], [], []
    for index, chunk, checked in _checked_chunks(files, data_format, checks.max_row_bytes, word):
        uri_of_file = files[index].uri
        read += chunk.read
        if read > checks.max_rows:  # stop reading here: the rest of the data is never parsed
            raise_too_many_rows(uri, checks.max_rows, f" (passed in {uri_of_file})")
        problems += checked.problems
        bad_values.update({(uri_of_file, row): value for row, value in chunk.raw.items()})
        bad_values.update({(uri_of_file, row): value for row, value in checked.bad_values.items()})
        ok_rows = chunk.rows[checked.ok]
        rows.append(ok_rows)
        file_ids.append(np.full(len(ok_rows), index, dtype=np.int32))
        exact.append(checked.exact)
        normalised.append(checked.normalised)
        if collect:
            tables.append(chunk.table.filter(pa.array(checked.ok)))
    rows, file_ids = _concat(rows, np.int64), _concat(file_ids, np.int32)
    exact, normalised = _concat(exact, np.uint64), _concat(normalised, np.uint64)
    kept_table = pa.concat_tables(tables) if tables else None
    rejected = _copies(checks, files, word, rows, file_ids, exact, normalised, reference)
    keep = np.ones(len(rows), dtype=bool)
    for position, rule, detail in rejected:
        keep[position] = False
        where = (files[file_ids[position]].uri, int(rows[position]))
        problems.append(Problem(*where, rule, "(row)", detail))
        if kept_table is not None:
            bad_values[where] = kept_table.slice(position, 1).to_pylist()[0]
    order = {f.uri: i for i, f in enumerate(files)}
    problems.sort(key=lambda p: (order[p.file], p.row))
    return Scan(uri, files, data_format, evidence, word, read, problems, bad_values,
                kept_table.filter(pa.array(keep)) if kept_table is not None else None,
                rows[keep], file_ids[keep], normalised[keep])


def raise_too_many_rows(uri: str, max_rows: int, where: str = "") -> None:
    raise DatasetError(f"{uri}: more than data_checks.max_rows={max_rows:,} rows{where}; train on a sample or a "
                       "smaller set of files, or raise the limit")


def _checked_chunks(files: list[SourceFile], data_format: str, max_row_bytes: int, word: str):
    """(file index, chunk, checks) in order. Checking chunk N runs in a thread while chunk N+1 is read:
    Arrow's parser and the numpy/hash work release the GIL, so the two overlap on two cores."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for index, source in enumerate(files):
            for chunk in read_chunks(source, data_format):
                future = pool.submit(check_chunk, chunk, data_format, max_row_bytes, word)
                if pending is not None:
                    yield pending[0], pending[1], pending[2].result()
                pending = (index, chunk, future)
        if pending is not None:
            yield pending[0], pending[1], pending[2].result()


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def _copies(checks: DataSettings, files, word, rows, file_ids, exact, normalised, reference) -> list[tuple]:
    """(position, rule, detail) of rows that copy an earlier row, or an eval row found in training."""
    rejected = []

    def where(position: int) -> str:
        return f"{word} {rows[position]}" + (f" of {files[file_ids[position]].uri}" if len(files) > 1 else "")

    remaining = np.arange(len(rows))
    if checks.duplicates == "reject":
        for rule, hashes in (("duplicate", exact), ("near_duplicate", normalised)):
            first = first_copies(hashes[remaining])
            copies = np.flatnonzero(first != np.arange(len(remaining)))
            rejected += [(int(remaining[i]), rule, f"same as {where(remaining[first[i]])}") for i in copies]
            remaining = np.delete(remaining, copies)
    if reference is not None and len(reference) and checks.leakage == "reject":
        leaked = remaining[np.isin(normalised[remaining], reference)]
        rejected += [(int(p), "leakage", "the same text (normalised) is a training row") for p in leaked]
    return rejected


# ---- the report ----------------------------------------------------------------------------------

def describe(scan: Scan) -> str:
    """Every broken rule with its count, fix and first rows; one message, never first-error-only."""
    lines = [f"{scan.source}: {len(scan.problems)} problem(s) in {scan.bad_rows} of {scan.read} row(s) for the "
             f"{scan.data_format} format ({scan.format_evidence})"]
    groups: dict[tuple[str, str], list[Problem]] = defaultdict(list)
    for problem in scan.problems:
        groups[(problem.rule, problem.field.split("[")[0])].append(problem)
    for (rule, column), members in groups.items():
        meaning, fix = RULES[rule]
        where = "" if column == "(row)" else f"column {column!r}, "
        lines.append(f"- {where}{meaning} ({rule}) in {len(members)} row(s): {fix}")
        for problem in members[:MAX_EXAMPLES_PER_RULE]:
            nested = f" ({problem.field})" if "[" in problem.field else ""
            lines.append(f"    {problem.file} {scan.word} {problem.row}{nested}: {problem.detail}")
        if len(members) > MAX_EXAMPLES_PER_RULE:
            lines.append(f"    ... and {len(members) - MAX_EXAMPLES_PER_RULE} more")
    return "\n".join(lines)


def quarantine_records(scan: Scan) -> list[dict]:
    """One record per bad row: where it came from, every reason, and the row itself."""
    by_row: dict[tuple[str, int], list[str]] = defaultdict(list)
    for problem in scan.problems:
        where = "" if problem.field == "(row)" else f" {problem.field}"
        by_row[(problem.file, problem.row)].append(f"{problem.rule}{where}: {problem.detail}")
    return [{"file": file, scan.word: row, "reasons": reasons, "data": scan.bad_values.get((file, row))}
            for (file, row), reasons in by_row.items()]


def write_quarantine(records: list[dict], path: Path) -> int:
    """One JSON object per quarantined row (see quarantine_records); returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return len(records)


# ---- datasets of conversations ----------------------------------------------------------------

@dataclass
class Dataset:
    source: str
    sha256: str
    data_format: str
    format_evidence: str
    conversations: list[Conversation] = field(repr=False)
    rows: list[int] = field(repr=False)  # source row number of each conversation
    scan: Scan | None = field(default=None, repr=False)
    origins: list[str] | None = field(default=None, repr=False)  # a mix: the source (path) of each conversation
    # preference pairs: conversations end with the chosen answer, and this is each pair's rejected one
    rejected: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.conversations)


def load_kept(uri: str, data_format: str, quarantined: set[tuple[str, int]]) -> tuple[pa.Table, list[int], dict]:
    """Re-read a dataset whose verdict is known (cached): every row except the quarantined ones.

    Returns the kept rows, their row numbers and the values of the quarantined rows. Rows that cannot
    be parsed must be among the quarantined ones, or the data changed under the cached verdict.
    """
    tables, rows, values = [], [], {}
    for source in list_source_files(uri):
        for chunk in read_chunks(source, data_format):
            stray = [p.row for p in chunk.problems if (source.uri, p.row) not in quarantined]
            if stray:
                raise DatasetError(f"{source.uri} {row_word(source)} {stray[0]}: cannot be read although its "
                                   "validation passed; the file changed while the run read it, start the run again")
            values.update({(source.uri, row): text for row, text in chunk.raw.items()})
            drop = np.array([(source.uri, int(r)) in quarantined for r in chunk.rows], dtype=bool)
            if drop.any():
                values.update(zip([(source.uri, int(r)) for r in chunk.rows[drop]],
                                  chunk.table.filter(pa.array(drop)).to_pylist()))
            tables.append(chunk.table.filter(pa.array(~drop)))
            rows.append(chunk.rows[~drop])
    return pa.concat_tables(tables), np.concatenate(rows).tolist(), values


def content_sha256(files: list[SourceFile]) -> str:
    """sha256 of the bytes (one file), or of the files' digests in order (a folder or prefix)."""
    digests = []
    for source in files:
        digest = hashlib.sha256()
        with open_stream(source) as stream:
            while block := stream.read(8 * 2**20):
                digest.update(block)
        digests.append(digest.hexdigest())
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def to_conversation(row: dict, data_format: str) -> Conversation:
    if data_format == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if data_format == "text":  # plain text: the whole text is what the model learns
        return [{"role": "assistant", "content": row["text"]}]
    if data_format == "instruction":
        extra = row.get("input")
        prompt = row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def split_dataset(dataset: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic train/eval split; both sides keep their source row numbers."""
    if dataset.rejected is not None:
        return _split_by_prompt(dataset, eval_fraction, seed)
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


def _split_by_prompt(dataset: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Preference pairs: every pair of a prompt on the same side (tasks/data/preference.split_preferences),
    so the eval set never asks a trained prompt."""
    from tasks.data.preference import PreferencePair, PreferenceSet, prompt_hash, split_preferences

    pairs = [PreferencePair(c[:-1], c[-1]["content"], r) for c, r in zip(dataset.conversations, dataset.rejected)]
    hashes = np.array([prompt_hash(p) for p in pairs], dtype=np.uint64)
    train, held_out = split_preferences(PreferenceSet(dataset.source, dataset.sha256, dataset.format_evidence, pairs,
                                                      list(range(len(pairs))), hashes), eval_fraction, seed)
    return _subset(dataset, train.rows), _subset(dataset, held_out.rows)


def _subset(dataset: Dataset, indices: list[int]) -> Dataset:
    return Dataset(
        source=dataset.source, sha256=dataset.sha256, data_format=dataset.data_format,
        format_evidence=dataset.format_evidence,
        conversations=[dataset.conversations[i] for i in indices],
        rows=[dataset.rows[i] for i in indices],
        origins=[dataset.origins[i] for i in indices] if dataset.origins is not None else None,
        rejected=None if dataset.rejected is None else [dataset.rejected[i] for i in indices],
    )


def write_conversations(dataset: Dataset, path) -> None:
    """Save a split as JSONL: one {"row", "messages"} object per line, row = source row number (in a mix, "source":
    the source it came from); preference pairs add "rejected" (messages end with the chosen answer:
    read_conversations gives the chosen side)."""
    origins = dataset.origins or [None] * len(dataset)
    rejected = dataset.rejected or [None] * len(dataset)
    with open(path, "w", encoding="utf-8") as out:
        for row, messages, origin, other in zip(dataset.rows, dataset.conversations, origins, rejected):
            record = ({"row": row, "messages": messages} if origin is None else
                      {"source": origin, "row": row, "messages": messages})
            record |= {"rejected": other} if other is not None else {}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_conversations(path) -> tuple[list[int], list[Conversation]]:
    """A split written by write_conversations: (source row numbers, conversations)."""
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r["row"] for r in records], [r["messages"] for r in records]
