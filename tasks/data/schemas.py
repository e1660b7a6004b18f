"""pandera schemas for the row formats, and the catalogue of rules a row can break.

Validation runs on per-row *facts* computed with Arrow kernels (a text field's value, a chat row's
message count, how many of its messages have an unknown role, ...), so every pandera check is
vectorised and a million rows validate in seconds. Validation is lazy: every failing rule is
collected, never first-error-only. Pure: pandas and pandera only.
"""
from __future__ import annotations

import pandera.pandas as pa
import pandas as pd

SCHEMA_VERSION = "2"  # part of the validation cache key: bump when a rule changes meaning
BYTES = "_bytes"  # column holding each row's size in its source file
ROLES = ("system", "user", "assistant")

# format -> (required text fields, optional text fields). Chat has one nested field, `messages`.
TEXT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
FORMATS = ("chat", "instruction", "prompt_completion", "text")


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message says where and how to fix it."""


# rule -> (what is wrong, how to fix it). Every problem a row can have is one of these.
RULES: dict[str, tuple[str, str]] = {
    "not_utf8": ("not valid UTF-8", "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"),
    "unreadable": ("cannot be parsed", "fix the syntax of this row or remove it"),
    "missing": ("value missing", "fill in the value or remove the row"),
    "not_text": ("not text", "make the value a string"),
    "not_blank": ("empty or only whitespace", "write a non-empty value or remove the row"),
    "bad_message": ("a message is not an object with text 'role' and 'content'",
                    "give every message a string role and content"),
    "empty_conversation": ("no messages", "add the conversation's messages or remove the row"),
    "null_in_message": ("a message, its role or its content is null", "fill in the message or remove it"),
    "unknown_role": ("unknown role", f"use one of {', '.join(ROLES)}"),
    "system_not_first": ("a system message after the first message", "move the system message first"),
    "role_order": ("roles do not alternate user, assistant", "reorder or merge the messages"),
    "no_final_assistant": ("the last message is not from the assistant",
                           "end with the assistant's answer (it is what the model learns)"),
    "oversized": ("row larger than data_checks.max_row_bytes",
                  "split or shorten the row, or raise data_checks.max_row_bytes"),
    "duplicate": ("exact duplicate of an earlier row", "remove the copy, or set data_checks.duplicates='allow'"),
    "near_duplicate": ("duplicate of an earlier row when case and whitespace are ignored",
                       "remove the copy, or set data_checks.duplicates='allow'"),
    "leakage": ("eval row also in the training data", "remove it from one side, or set data_checks.leakage='allow'"),
    # preference pairs (tasks/data/preference.py)
    "not_text_or_messages": ("neither text nor a list of {role, content} messages",
                             "give the value as text, or as a list of messages"),
    "no_prompt": ("no prompt: 'prompt' is missing and chosen/rejected are not whole conversations",
                  "give a 'prompt', or make chosen and rejected conversations that start with the user's message"),
    "prompt_missing": ("this side has no user message: the prompt is missing from it",
                       "start chosen and rejected with the same messages up to the user's question"),
    "prompt_mismatch": ("chosen and rejected do not share the same prompt",
                        "make both conversations start with the same messages up to the user's last question"),
    "answer_shape": ("the answer is not one assistant message",
                     "give chosen and rejected as text or as one assistant message (the prompt goes in 'prompt')"),
    "same_answer": ("chosen and rejected are the same answer (whitespace ignored)",
                    "give a different rejected answer, or remove the pair: it teaches nothing"),
    "prompt_leakage": ("eval pair whose prompt is also a training prompt",
                       "move the pairs of this prompt to one side, or set data_checks.leakage='allow'"),
}


def _no_problem(name: str) -> pa.Check:
    """A per-row count of broken parts that must be zero."""
    return pa.Check(lambda counts: counts == 0, name=name)


def _not_blank() -> pa.Check:
    # Vectorised; a null is reported by `nullable`, not here.
    return pa.Check(lambda s: s.isna() | (s.str.strip().str.len() > 0), name="not_blank")


def _size_column(max_row_bytes: int) -> pa.Column:
    return pa.Column(int, pa.Check(lambda s: s <= max_row_bytes, name="oversized"))


def row_schema(data_format: str, max_row_bytes: int) -> pa.DataFrameSchema:
    """The pandera schema that one chunk's facts frame must satisfy."""
    if data_format == "chat":
        columns = {
            "messages": pa.Column(float, pa.Check(lambda n: n >= 1, name="empty_conversation"),
                                  nullable=False),
            "null_in_message": pa.Column(int, _no_problem("null_in_message")),
            "unknown_role": pa.Column(int, _no_problem("unknown_role")),
            "not_blank": pa.Column(int, _no_problem("not_blank")),
            "system_not_first": pa.Column(int, _no_problem("system_not_first")),
            "role_order": pa.Column(int, _no_problem("role_order")),
            "no_final_assistant": pa.Column(int, _no_problem("no_final_assistant")),
        }
    else:
        required, optional = TEXT_FIELDS[data_format]
        columns = {name: pa.Column(checks=_not_blank(), nullable=False) for name in required}
        columns |= {name: pa.Column(nullable=True, required=False) for name in optional}
    columns[BYTES] = _size_column(max_row_bytes)
    return pa.DataFrameSchema(columns, name=data_format, coerce=False)


def failing_rows(facts: pd.DataFrame, data_format: str, max_row_bytes: int) -> pd.DataFrame:
    """(position, rule, field) for every broken rule of every row of `facts`; empty when all pass."""
    try:
        row_schema(data_format, max_row_bytes).validate(facts, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        cases = cases[cases["index"].notna()]
        check = cases["check"].astype(str).str.split("(").str[0]
        rule = check.where(check != "not_nullable", "missing")
        field = cases["column"].astype(str).where(~cases["column"].isin(_CHAT_FACTS), "messages")
        field = field.where(field != BYTES, "(row)")
        return pd.DataFrame({"position": cases["index"].astype(int).to_numpy(), "rule": rule.to_numpy(),
                             "field": field.to_numpy()})
    return pd.DataFrame({"position": pd.Series(dtype=int), "rule": pd.Series(dtype=str),
                         "field": pd.Series(dtype=str)})


_CHAT_FACTS = ("messages", "null_in_message", "unknown_role", "not_blank", "system_not_first", "role_order",
               "no_final_assistant")


def conversation_problem(messages) -> str | None:
    """Why a chat row is unusable, in words, or None when it is fine (used for the report's excerpts)."""
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of {role, content} objects"
    roles = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
            return f"message {i} must be an object with a 'role' and a 'content' (got {_excerpt(message)})"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}; use one of {', '.join(ROLES)}"
        if not str(message["content"]).strip():
            return f"message {i} ({message['role']}) has empty content"
        roles.append(message["role"])
    if "system" in roles[1:]:
        return f"a system message may only come first (message {roles.index('system', 1)})"
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)]:
        return f"roles must alternate user, assistant (got {', '.join(roles)})"
    if turns[-1] != "assistant":
        return "the last message must be from the assistant (it is what the model learns)"
    return None


def _excerpt(value, width: int = 60) -> str:
    text = repr(value)
    return text[:width] + "..." if len(text) > width else text
