"""Task metrics on generated answers. Computed here, not fetched: `evaluate.load("exact_match")`
downloads its script from the Hub and fails air-gapped. Pure: no torch, no Prefect."""
from __future__ import annotations

import re
import string

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (the usual SQuAD-style normalisation)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


METRICS = {"exact_match": exact_match}
