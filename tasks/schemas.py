"""pandera schemas for the three row formats, and the error report users read when rows are bad.

Validation is lazy: every failing rule is collected and reported at once, each with the file, the
row (JSONL: line number) and the column, and how to fix it. Pure: pandas and pandera only.
"""
from __future__ import annotations

import pandera.pandas as pa
import pandas as pd

ROW = "_row"  # column holding each row's 1-based position in its source file
ROLES = ("system", "user", "assistant")
MAX_EXAMPLES_PER_RULE = 5


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message says where and how to fix it."""


def _is_text(value) -> bool:
    return isinstance(value, str)


def _not_blank(value) -> bool:
    return not isinstance(value, str) or bool(value.strip())


def conversation_problem(messages) -> str | None:
    """Why a chat row is unusable, or None when it is fine."""
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of {role, content} objects"
    roles = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            return f"message {i} must be an object with 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}; use one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str) or not message["content"].strip():
            return f"message {i} ({message['role']}) has empty content"
        roles.append(message["role"])
    if "system" in roles[1:]:
        return "a system message may only come first"
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)]:
        return f"roles must alternate user, assistant (got {', '.join(roles)})"
    if turns[-1] != "assistant":
        return "the last message must be from the assistant (it is what the model learns)"
    return None


def _text(required: bool = True) -> pa.Column:
    return pa.Column(
        checks=[
            pa.Check(_is_text, element_wise=True, name="is_text"),
            pa.Check(_not_blank, element_wise=True, name="not_blank"),
        ],
        nullable=not required,
        required=required,
    )


SCHEMAS: dict[str, pa.DataFrameSchema] = {
    "instruction": pa.DataFrameSchema(
        {"instruction": _text(), "input": pa.Column(
            checks=pa.Check(_is_text, element_wise=True, name="is_text"),
            nullable=True, required=False,
        ), "output": _text()},
        name="instruction",
    ),
    "prompt_completion": pa.DataFrameSchema(
        {"prompt": _text(), "completion": _text()}, name="prompt_completion"
    ),
    "chat": pa.DataFrameSchema(
        {"messages": pa.Column(
            checks=pa.Check(lambda v: conversation_problem(v) is None, element_wise=True, name="valid_conversation"),
        )},
        name="chat",
    ),
}

RULES = {  # check name -> (what failed, how to fix it)
    "column_in_dataframe": ("missing column", "add the column, or set data_format to the file's real format"),
    "not_nullable": ("value missing", "fill in the value or remove the row"),
    "is_text": ("not text", "make the value a string"),
    "not_blank": ("empty or only whitespace", "write a non-empty value or remove the row"),
    "valid_conversation": ("invalid conversation", "fix the messages or remove the row"),
}


def validate_rows(frame: pd.DataFrame, data_format: str, source: str, row_word: str = "row") -> None:
    """Raise one DatasetError listing every broken rule, or return when all rows are valid."""
    try:
        SCHEMAS[data_format].validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        raise DatasetError(_describe(errors.failure_cases, frame, data_format, source, row_word)) from None


def _describe(failures: pd.DataFrame, frame: pd.DataFrame, data_format: str, source: str, row_word: str) -> str:
    bad_rows = int(failures["index"].dropna().nunique())
    where = f" in {bad_rows} of {len(frame)} row(s)" if bad_rows else ""
    lines = [f"{source}: {len(failures)} problem(s){where} for the {data_format} format "
             f"(columns found: {', '.join(c for c in frame.columns if c != ROW)})"]
    for (column, check), group in failures.groupby(["column", "check"], dropna=False, sort=False):
        check_name = str(check).split("(")[0]
        meaning, fix = RULES.get(check_name, (check_name, "fix the value"))
        if check_name == "column_in_dataframe":
            for missing in group["failure_case"]:
                lines.append(f"- column {missing!r} is missing: {fix}")
            continue
        lines.append(f"- column {column!r}, {meaning} ({check_name}) in {len(group)} row(s): {fix}")
        for _, failure in group.head(MAX_EXAMPLES_PER_RULE).iterrows():
            position = frame.loc[failure["index"], ROW] if failure["index"] in frame.index else "?"
            reason = _reason(check_name, failure["failure_case"])
            lines.append(f"    {source} {row_word} {position}: {reason}")
    return "\n".join(lines)


def _reason(check_name: str, value) -> str:
    if check_name == "valid_conversation":
        return conversation_problem(value) or "invalid conversation"
    if check_name == "not_nullable":
        return "value is missing"
    excerpt = repr(value)
    return f"got {excerpt[:60] + '...' if len(excerpt) > 60 else excerpt}"
