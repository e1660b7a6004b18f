"""Preference pairs: a prompt with a chosen and a rejected answer, for DPO and ORPO (issue 21).

Accepted rows (one form per row; a file may mix them):
- explicit prompt: `prompt` as text or as messages (optional system first, user/assistant alternating,
  ending with the user's question), `chosen` and `rejected` as text or as one assistant message
  (a side that repeats the prompt's messages first is accepted, the repeat is dropped);
- conversational: no `prompt`; `chosen` and `rejected` are whole conversations that share their
  messages up to the user's last question. That shared prefix becomes the prompt.

Every pair becomes the same thing: prompt messages ending with a user message, and one assistant
message on each side. The checks follow the other formats (tasks/data/quality.py): per-row facts are
validated by a pandera schema, lazily, and each broken rule is a Problem naming file, row and field,
reported with its fix by the same report (tasks/data/dataset.py, `describe`). Duplicates are whole
pairs (exact, or ignoring ASCII case and whitespace); leakage is on the prompt: an eval pair whose
prompt is a training prompt tests what was trained. Rows are polymorphic (text or messages in one
column), so they are read as Python records rather than typed Arrow chunks. Pure: no torch.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as arrow

from tasks.data.dataset import Scan, content_sha256, raise_too_many_rows
from tasks.data.quality import WHITESPACE, excerpt, first_copies
from tasks.data.reading import (
    CHUNK_BYTES,
    Problem,
    _csv_rows,
    _decoded_lines,
    _json_or_raw,
    _load_json_array,
    reading,
    row_word,
)
from tasks.data.schemas import BYTES, ROLES, DatasetError
from tasks.data.settings import DataSettings
from tasks.data.sources import SourceFile, list_source_files, open_seekable, open_stream
from tasks.data.tokenization import IGNORE_INDEX, Example, assistant_spans, encode_all

SIDES = ("chosen", "rejected")
FIELDS = ("prompt",) + SIDES
# (field, rule) pairs a normalised row can break: the columns of the facts frame the schema checks
ROW_RULES = tuple((f, r) for f in FIELDS for r in (
    "missing", "not_text_or_messages", "bad_message", "null_in_message", "unknown_role", "not_blank",
    "role_order", "prompt_missing", "answer_shape")) + (("prompt", "no_prompt"), ("rejected", "prompt_mismatch"),
                                                        ("rejected", "same_answer"))


@dataclass
class PreferencePair:
    prompt: list[dict]  # messages ending with the user's question
    chosen: str  # the preferred answer
    rejected: str

    def conversation(self, side: str) -> list[dict]:
        return self.prompt + [{"role": "assistant", "content": getattr(self, side)}]


@dataclass
class PreferenceSet:
    source: str
    sha256: str
    format_evidence: str
    pairs: list[PreferencePair] = field(repr=False)
    rows: list[int] = field(repr=False)  # source row number of each pair
    prompt_hashes: np.ndarray = field(repr=False)  # normalised prompt hashes: the leakage reference

    def __len__(self) -> int:
        return len(self.pairs)


# ---- one row -> a pair, or the rules it breaks ------------------------------------------------

class _Broken(Exception):
    def __init__(self, field_name: str, rule: str, detail: str):
        super().__init__(detail)
        self.field, self.rule, self.detail = field_name, rule, detail


def normalise_row(row) -> PreferencePair:
    """The pair a row holds; raises _Broken (field, rule, detail) on the first rule it breaks."""
    if not isinstance(row, dict):
        raise _Broken("(row)", "unreadable", f"expected a JSON object, got {type(row).__name__}")
    values = {name: row.get(name) for name in FIELDS}
    for side in SIDES:
        if values[side] is None:
            raise _Broken(side, "missing", "value is missing")
    messages = {name: _messages(name, value) for name, value in values.items() if value is not None}
    if values["prompt"] is None:
        prompt, answers = _split_conversations(messages)
    else:
        prompt = messages["prompt"]
        _check_prompt_order("prompt", prompt)
        answers = {side: _answer(side, messages[side], prompt) for side in SIDES}
    if answers["chosen"].strip() == answers["rejected"].strip():
        raise _Broken("rejected", "same_answer", f"both are {excerpt(answers['chosen'])}")
    return PreferencePair(prompt, answers["chosen"], answers["rejected"])


def _messages(name: str, value) -> list[dict]:
    """A field as messages: text is one message (the user's for the prompt, the assistant's for an answer)."""
    if isinstance(value, str):
        if not value.strip():
            raise _Broken(name, "not_blank", f"got {excerpt(value)}")
        return [{"role": "user" if name == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list):
        raise _Broken(name, "not_text_or_messages", f"got {type(value).__name__} {excerpt(value)}")
    if not value:
        raise _Broken(name, "not_blank", "an empty list of messages")
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if message is None or (isinstance(message, dict) and (message.get("role") is None
                                                             or message.get("content") is None)):
            raise _Broken(where, "null_in_message", f"got {excerpt(message)}")
        if not isinstance(message, dict) or not all(isinstance(message[k], str) for k in ("role", "content")):
            raise _Broken(where, "bad_message", f"got {excerpt(message)}")
        if message["role"] not in ROLES:
            raise _Broken(where, "unknown_role", f"role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not message["content"].strip():
            raise _Broken(where, "not_blank", f"{message['role']} message with content {excerpt(message['content'])}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_prompt_order(name: str, prompt: list[dict]) -> None:
    """Optional system message first, then user/assistant alternating, ending with the user's question."""
    roles = [m["role"] for m in prompt]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or "system" in turns or turns != expected[:len(turns)] or turns[-1] != "user":
        raise _Broken(name, "role_order", f"roles {', '.join(roles)}; the prompt must be [system,] user, "
                      "assistant, ..., user: it ends with the question the answers reply to")


def _answer(side: str, messages: list[dict], prompt: list[dict]) -> str:
    if len(messages) > len(prompt) and messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]  # the side repeats the prompt first: drop the repeat
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise _Broken(side, "answer_shape", f"roles {', '.join(m['role'] for m in messages)}")
    return messages[0]["content"]


def _split_conversations(messages: dict[str, list[dict]]) -> tuple[list[dict], dict[str, str]]:
    """Whole conversations -> (their shared prompt, each side's answer)."""
    asks = {side: any(m["role"] == "user" for m in messages[side]) for side in SIDES}
    if not any(asks.values()):
        raise _Broken("prompt", "no_prompt", "chosen and rejected are answers without a prompt")
    prompts, answers = {}, {}
    for side in SIDES:
        roles = [m["role"] for m in messages[side]]
        if not asks[side]:
            other = "rejected" if side == "chosen" else "chosen"
            raise _Broken(side, "prompt_missing", f"roles {', '.join(roles)}, while {other} starts with the prompt")
        last_question = len(roles) - 1 - roles[::-1].index("user")
        prompts[side] = messages[side][:last_question + 1]
        _check_prompt_order(side, prompts[side])
        answers[side] = _answer(side, messages[side][last_question + 1:], [])
    if prompts["chosen"] != prompts["rejected"]:
        raise _Broken("rejected", "prompt_mismatch", _first_difference(prompts["chosen"], prompts["rejected"]))
    return prompts["chosen"], answers


def _first_difference(chosen: list[dict], rejected: list[dict]) -> str:
    for i, (a, b) in enumerate(zip(chosen, rejected)):
        if a != b:
            return f"message {i} differs: chosen has {excerpt(a)}, rejected has {excerpt(b)}"
    return f"chosen's prompt has {len(chosen)} message(s), rejected's {len(rejected)}"


# ---- the pandera schema over per-row facts ------------------------------------------------------

def _column(field_name: str, rule: str) -> str:
    return f"{field_name}:{rule}"


def preference_schema(max_row_bytes: int) -> pa.DataFrameSchema:
    """Every (field, rule) fact must be 0; rows must fit max_row_bytes."""
    columns = {_column(f, r): pa.Column(int, pa.Check(lambda n: n == 0, name=r)) for f, r in ROW_RULES}
    columns[BYTES] = pa.Column(int, pa.Check(lambda s: s <= max_row_bytes, name="oversized"))
    return pa.DataFrameSchema(columns, name="preference", coerce=False)


def _facts(broken: list[_Broken | None], sizes: list[int]) -> pd.DataFrame:
    facts = pd.DataFrame(0, index=range(len(broken)), columns=[_column(f, r) for f, r in ROW_RULES], dtype=int)
    for position, problem in enumerate(broken):
        if problem is not None:
            facts.loc[position, _column(problem.field.split("[")[0], problem.rule)] = 1
    facts[BYTES] = np.asarray(sizes, dtype=np.int64)
    return facts


def _failures(facts: pd.DataFrame, max_row_bytes: int) -> list[tuple[int, str]]:
    """(position, column) of every failing fact, from pandera's lazy validation."""
    try:
        preference_schema(max_row_bytes).validate(facts, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        cases = cases[cases["index"].notna()]
        return list(zip(cases["index"].astype(int), cases["column"].astype(str)))
    return []


# ---- reading records ----------------------------------------------------------------------------

def _records(source: SourceFile):
    """(row number, record or (field, rule, detail), size in bytes, raw text) for every row of a file."""
    if source.suffix == "jsonl":
        yield from _decoded_lines(_jsonl_lines(source))
    elif source.suffix == "json":
        for number, record in enumerate(_load_json_array(source), start=1):
            text = json.dumps(record, ensure_ascii=False)
            yield number, record, len(text.encode()), text
    elif source.suffix == "csv":
        yield from _csv_records(source)
    else:
        yield from _columnar_records(source)


def _jsonl_lines(source: SourceFile):
    """(line number, bytes) of every non-blank line, read in blocks."""
    number, carry = 0, b""
    with open_stream(source) as stream:
        while block := stream.read(CHUNK_BYTES):
            lines = (carry + block).split(b"\n")
            carry = lines.pop()
            for line in lines:
                number += 1
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not data
                if line.strip():
                    yield number, line
        if carry.strip():
            yield number + 1, carry.removeprefix(b"\xef\xbb\xbf") if number == 0 else carry


def _csv_records(source: SourceFile):
    import csv
    import io

    with open_stream(source) as stream:
        reader = csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""), strict=True)
        header = next(reader, None) or []
        for number, record, size, text in _csv_rows(source, reader, header):
            if isinstance(record, dict):  # messages in a CSV cell are written as JSON
                record = {k: _json_or_raw(v) if v.lstrip().startswith("[") else v for k, v in record.items()}
                record = {k: v for k, v in record.items() if v != "" or k not in FIELDS}
            yield number, record, size, text


def _columnar_records(source: SourceFile):
    import pyarrow.parquet as pq

    with open_seekable(source) as stream:
        if source.suffix == "arrow":
            batches = iter(arrow.ipc.open_stream(stream))
        else:
            parquet = pq.ParquetFile(stream)
            batches = parquet.iter_batches(columns=[n for n in FIELDS if n in parquet.schema_arrow.names])
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                text = json.dumps(record, ensure_ascii=False, default=str)
                yield number, record, len(text.encode()), text


# ---- a whole dataset ------------------------------------------------------------------------------

@dataclass
class _Collected:
    read: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_values: dict = field(default_factory=dict)
    pairs: list[PreferencePair] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    paired: int = 0  # rows with both a chosen and a rejected field: the format's evidence


def scan_preferences(uri: str, checks: DataSettings | None = None,
                     reference: np.ndarray | None = None) -> tuple[Scan, list[PreferencePair]]:
    """Read and check every row of `uri` as preference pairs. Returns the Scan (the same report,
    verdict and policy as the other formats: tasks/data/validation.py) and the kept pairs, in order.
    `reference`: the training prompts' hashes (PreferenceSet.prompt_hashes), for an eval set."""
    checks = checks or DataSettings()
    files = list_source_files(uri, checks.max_file_bytes)
    word = row_word(files[0])
    got = _Collected()
    for index, source in enumerate(files):
        with reading(source):
            _collect_file(source, index, checks, got)
        if got.read > checks.max_rows:
            raise_too_many_rows(uri, checks.max_rows, f" (passed in {source.uri})")
    keep = _reject_copies(got, files, word, checks, reference)
    order = {f.uri: i for i, f in enumerate(files)}
    got.problems.sort(key=lambda p: (order[p.file], p.row))
    rows, file_ids = np.array(got.rows, dtype=np.int64), np.array(got.files, dtype=np.int32)
    prompts = np.array([prompt_hash(p) for p in got.pairs], dtype=np.uint64)
    evidence = f"fields chosen, rejected in {got.paired} of {got.read} rows"
    scan = Scan(uri, files, "preference", evidence, word, got.read, got.problems, got.bad_values, None,
                rows[keep], file_ids[keep], prompts[keep] if len(prompts) else prompts)
    return scan, [pair for pair, kept in zip(got.pairs, keep) if kept]


def _collect_file(source: SourceFile, index: int, checks: DataSettings, got: _Collected) -> None:
    parsed = []  # (row number, record, size, pair or None, the rule it broke or None)
    for number, value, size, text in _records(source):
        got.read += 1
        if not isinstance(value, (dict, tuple)):
            value = ("(row)", "unreadable", f"expected a JSON object, got {type(value).__name__}")
        if isinstance(value, tuple):  # a row that cannot be parsed: reported as the other formats do
            got.problems.append(Problem(source.uri, number, value[1], value[0], value[2]))
            got.bad_values[(source.uri, number)] = text
            continue
        got.paired += "chosen" in value and "rejected" in value
        try:
            parsed.append((number, value, size, normalise_row(value), None))
        except _Broken as problem:
            parsed.append((number, value, size, None, problem))
    facts = _facts([p[4] for p in parsed], [p[2] for p in parsed])
    bad = set()
    for position, column in _failures(facts, checks.max_row_bytes):
        number, value, size, _, problem = parsed[position]
        if column == BYTES:
            got.problems.append(Problem(source.uri, number, "oversized", "(row)",
                                        f"{size:,} bytes, the limit is {checks.max_row_bytes:,}"))
        else:
            got.problems.append(Problem(source.uri, number, problem.rule, problem.field, problem.detail))
        got.bad_values[(source.uri, number)] = value
        bad.add(position)
    for position, (number, _, _, pair, _) in enumerate(parsed):
        if position in bad:
            continue
        if pair is None:  # a broken rule the schema has no column for: never keep such a row silently
            raise RuntimeError(f"{source.uri} {number}: {parsed[position][4].rule} is not in the preference "
                               "schema; this is a bug, please report it")
        got.pairs.append(pair)
        got.rows.append(number)
        got.files.append(index)


def _reject_copies(got: _Collected, files, word: str, checks: DataSettings, reference) -> np.ndarray:
    """Which kept pairs survive the duplicate and leakage checks (they become Problems otherwise)."""
    keep = np.ones(len(got.pairs), dtype=bool)

    def reject(position: int, rule: str, detail: str) -> None:
        keep[position] = False
        where = (files[got.files[position]].uri, got.rows[position])
        got.problems.append(Problem(*where, rule, "(row)", detail))
        pair = got.pairs[position]
        got.bad_values[where] = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}

    def name(position: int) -> str:
        return f"{word} {got.rows[position]}" + (f" of {files[got.files[position]].uri}" if len(files) > 1 else "")

    if checks.duplicates == "reject":
        for rule, normalised in (("duplicate", False), ("near_duplicate", True)):
            remaining = np.flatnonzero(keep)
            hashes = np.array([_hash(pair_text(got.pairs[i]), normalised) for i in remaining], dtype=np.uint64)
            first = first_copies(hashes)
            for i in np.flatnonzero(first != np.arange(len(remaining))):
                reject(int(remaining[i]), rule, f"same pair as {name(int(remaining[first[i]]))}")
    if reference is not None and len(reference) and checks.leakage == "reject":
        remaining = np.flatnonzero(keep)
        prompts = np.array([prompt_hash(got.pairs[i]) for i in remaining], dtype=np.uint64)
        for position in remaining[np.isin(prompts, reference)]:
            reject(int(position), "prompt_leakage", "the same prompt (normalised) has training pairs")
    return keep


def prompt_text(pair: PreferencePair) -> str:
    return "\x1d".join(f"{m['role']}\x1e{m['content']}" for m in pair.prompt)


def pair_text(pair: PreferencePair) -> str:
    return "\x1f".join((prompt_text(pair), pair.chosen, pair.rejected))


def prompt_hash(pair: PreferencePair) -> int:
    return _hash(prompt_text(pair), normalised=True)


def _hash(text: str, normalised: bool) -> int:
    """64-bit blake2b of the text, or of it without ASCII case and whitespace (as tasks/data/quality.py)."""
    data = text.encode()
    if normalised:
        data = data.lower().translate(None, WHITESPACE)  # bytes.lower() lowers ASCII letters only
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def read_preferences(uri: str, checks: DataSettings | None = None,
                     reference: np.ndarray | None = None) -> PreferenceSet:
    """Load and check a preference dataset; raise DatasetError naming file, row and field."""
    from tasks.data.validation import enforce, verdict_of

    checks = checks or DataSettings()
    scan, pairs = scan_preferences(uri, checks, reference)
    enforce(verdict_of(scan), checks)
    return PreferenceSet(uri, content_sha256(scan.files), scan.format_evidence, pairs, scan.kept_rows.tolist(),
                         scan.kept_normalised)


def load_kept_pairs(uri: str, quarantined: set[tuple[str, int]]) -> tuple[list[PreferencePair], list[int], dict]:
    """Re-read a dataset whose verdict is known (cached): the pairs of every row but the quarantined ones,
    their row numbers, and the quarantined rows' values. As tasks/data/dataset.load_kept: a kept row
    that no longer makes a pair means the data changed under the cached verdict."""
    pairs, rows, values = [], [], {}
    for source in list_source_files(uri):
        for number, value, _, text in _records(source):
            if (source.uri, number) in quarantined:
                values[(source.uri, number)] = value if isinstance(value, dict) else text
                continue
            try:
                pairs.append(normalise_row(value if isinstance(value, dict) else None))
            except _Broken as problem:
                raise DatasetError(f"{source.uri} {row_word(source)} {number}: {problem.detail} ({problem.rule}), "
                                   "although its validation passed; the file changed while the run read it, "
                                   "start the run again") from None
            rows.append(number)
    return pairs, rows, values


def read_pairs(path) -> list[PreferencePair]:
    """The pairs of a split ingest wrote (tasks/data/dataset.write_conversations): messages end with the
    chosen answer, `rejected` beside them."""
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    missing = [r["row"] for r in records if "rejected" not in r]
    if missing:
        raise DatasetError(f"{path}: row {missing[0]} has no rejected answer: this split holds no preference "
                           "pairs; dpo and orpo need preference rows (prompt, chosen, rejected)")
    return [PreferencePair(r["messages"][:-1], r["messages"][-1]["content"], r["rejected"]) for r in records]


def encoded_pairs(config, split_file, tokenizer=None) -> list[PairExample]:
    """A split's pairs, encoded with the model's chat template (config: as tokenization.encoded_split's)."""
    from tasks.data.tokenization import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(config.model, config.model_loading)
    return encode_pairs(tokenizer, read_pairs(split_file), config.training.max_seq_len)


def split_preferences(pairs: PreferenceSet, eval_fraction: float, seed: int) -> tuple[PreferenceSet, PreferenceSet]:
    """Deterministic train/eval split by prompt: every pair of a prompt lands on the same side, so the
    eval set never asks a trained prompt (the leakage rule)."""
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(pairs.prompt_hashes.tolist()):
        groups.setdefault(h, []).append(i)
    if len(groups) < 2:
        raise DatasetError(f"{pairs.source}: {len(groups)} distinct prompt(s) cannot be split into train and eval "
                           "without the same prompt on both sides; add prompts or give eval_data")
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, round(len(keys) * eval_fraction)))
    eval_idx = sorted(i for k in keys[:n_eval] for i in groups[k])
    train_idx = sorted(i for k in keys[n_eval:] for i in groups[k])
    return _subset(pairs, train_idx), _subset(pairs, eval_idx)


def _subset(pairs: PreferenceSet, indices: list[int]) -> PreferenceSet:
    return PreferenceSet(pairs.source, pairs.sha256, pairs.format_evidence, [pairs.pairs[i] for i in indices],
                         [pairs.rows[i] for i in indices], pairs.prompt_hashes[indices])


# ---- encoding ---------------------------------------------------------------------------------------

@dataclass
class PairExample:
    """Token ids of prompt + chosen and prompt + rejected; labels only on each side's answer."""
    chosen: Example
    rejected: Example


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_seq_len: int) -> list[PairExample]:
    """Both sides of every pair, rendered with the chat template and masked as chat rows are
    (tasks/data/tokenization.py): the loss sees each side's answer and its end-of-turn marker only.
    A prompt with earlier assistant turns keeps them masked: only the final answer is compared."""
    conversations = [pair.conversation(side) for pair in pairs for side in SIDES]
    single_turn = [i for i, c in enumerate(conversations) if sum(m["role"] == "assistant" for m in c) == 1]
    examples: list[Example | None] = [None] * len(conversations)
    # One answer per conversation: the chat rows' batched encoder masks exactly what is wanted.
    for i, example in zip(single_turn, encode_all(tokenizer, [conversations[i] for i in single_turn], max_seq_len)):
        examples[i] = example
    for i, conversation in enumerate(conversations):
        if examples[i] is None:
            examples[i] = encode_final_answer(tokenizer, conversation, max_seq_len)
    return [PairExample(examples[2 * i], examples[2 * i + 1]) for i in range(len(pairs))]


def encode_final_answer(tokenizer, conversation: list[dict], max_seq_len: int) -> Example:
    """As tokenization.encode, with only the last assistant message's span as targets."""
    text, spans = assistant_spans(tokenizer, conversation)
    start, end = spans[-1]  # assistant_spans always finds the final answer, or raises
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [token if start <= char_start < end else IGNORE_INDEX
              for token, (char_start, _) in zip(ids, encoding["offset_mapping"])]
    return Example(ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len, max(0, len(ids) - max_seq_len))
