"""Structured output: how many predictions are valid JSON, and how many equal their reference's JSON."""
import json
import re

import datasets
import evaluate

# Chat models often wrap JSON in a markdown fence; the JSON inside is what a consumer would parse.
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)
_INVALID = object()


def parse_json(text: str):
    text = text.strip()
    fenced = _FENCE.match(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return _INVALID


class JsonValid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="json_valid: share of predictions that parse as JSON (a ```json fence is allowed); "
                        "json_match: share whose parsed value equals the parsed reference.",
            citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"json_valid": 0.0, "json_match": 0.0}
        parsed = [(parse_json(p), parse_json(r)) for p, r in zip(predictions, references)]
        valid = sum(p is not _INVALID for p, _ in parsed)
        match = sum(p is not _INVALID and p == r for p, r in parsed)
        return {"json_valid": valid / len(references), "json_match": match / len(references)}
