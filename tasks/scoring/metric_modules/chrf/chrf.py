"""Corpus chrF (sacrebleu), scaled to [0, 1]: character n-gram F-score, robust on short answers."""
import datasets
import evaluate
from sacrebleu.metrics import CHRF


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu corpus chrF divided by 100.",
            citation="Popovic, chrF: character n-gram F-score for automatic MT evaluation, 2015",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"chrf": 0.0}
        return {"chrf": CHRF().corpus_score(predictions, [references]).score / 100}
