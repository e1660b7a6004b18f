"""Exact match after SQuAD-style normalisation (case, punctuation and spacing ignored)."""
import re
import string

import datasets
import evaluate

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to their reference after lower-casing and dropping "
                        "punctuation and extra spaces.",
            citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(references) if references else 0.0}
