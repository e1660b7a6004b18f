"""ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge_score, Porter stemming), averaged over rows."""
import datasets
import evaluate
from rouge_score import rouge_scorer

_TYPES = ("rouge1", "rouge2", "rougeL")


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean ROUGE-1/2/L F-measure of each prediction against its reference.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(_TYPES), use_stemmer=True)
        totals = dict.fromkeys(_TYPES, 0.0)
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)
            for kind in _TYPES:
                totals[kind] += scores[kind].fmeasure
        return {kind: total / len(references) if references else 0.0 for kind, total in totals.items()}
