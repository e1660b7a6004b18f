"""How a model is scored: which metrics, on how many rows; tasks/config.py gathers it into the run's config."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.scoring.metrics import PAIR_SCORES, MetricName, ScoreName, module_of


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown keys are typos (`learning_rte`): rejected
    metric: ScoreName = Field(
        "exact_match", description="Headline score, and the one the promotion gate compares: exact_match (case, "
        "punctuation and spaces normalised), rouge1/rouge2/rougeL, chrf, bleu, json_valid or json_match. "
        "Every score is in [0, 1], higher is better. Preference runs (objective dpo or orpo) can also gate on "
        "preference_accuracy (share of held-out pairs whose chosen answer gets the higher implicit reward, "
        "the base model being the reference) or logp_accuracy (share whose chosen answer is more likely).",
    )
    metrics: list[MetricName] = Field(
        default_factory=lambda: ["exact_match"],
        description="Metric modules computed on generated answers (shipped locally, work offline): exact_match, "
        "rouge, chrf, bleu, json_valid. The module of `metric` is always added.",
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generation length for the task metrics.")
    max_generation_rows: int = Field(64, ge=1, description="Eval rows used for generation (loss uses all).")
    max_eval_rows: int | None = Field(
        None, ge=1, description="Cap on the eval rows used for eval loss (the first N); empty: all of them."
    )
    batch_size: int = Field(16, ge=1, description="Rows per batch for eval loss and generation.")
    examples_in_report: int = Field(4, ge=0, le=50, description="Base-vs-tuned answers shown in the report.")
    reuse_base_score: bool = Field(
        True, description="Reuse the base model's score from an earlier run under the same output when the base "
        "model's files, the eval rows, these settings and the scoring code are all unchanged (kept in "
        "<output>/score-cache/). Off: the base is scored in every run.",
    )

    @model_validator(mode="after")
    def _include_the_headline_module(self) -> EvaluationSettings:
        # The headline score must be computed; adding its module beats failing a run over it.
        if self.metric not in PAIR_SCORES and module_of(self.metric) not in self.metrics:
            self.metrics = [*self.metrics, module_of(self.metric)]
        return self
