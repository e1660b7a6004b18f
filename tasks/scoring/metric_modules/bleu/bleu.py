"""Corpus BLEU (sacrebleu, default 13a tokenisation), scaled to [0, 1]."""
import datasets
import evaluate
from sacrebleu.metrics import BLEU


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu corpus BLEU divided by 100.",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, 2018",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"bleu": 0.0}
        return {"bleu": BLEU().corpus_score(predictions, [references]).score / 100}
