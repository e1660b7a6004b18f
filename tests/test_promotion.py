"""The promotion gate's checks: each passes and blocks with its threshold set either side."""
import math

import pytest
from pydantic import ValidationError

from tasks.config import EvaluationSettings, PublishSettings
from tasks.scoring.promotion import ModelScores, promotion_gate

BASE, TUNED = ModelScores(score=0.25, loss=2.0), ModelScores(score=0.75, loss=0.5)


def test_tuned_must_beat_base_by_min_improvement():
    assert promotion_gate("exact_match", BASE, TUNED, min_improvement=0.5).promote
    blocked = promotion_gate("exact_match", BASE, TUNED, min_improvement=0.51)
    assert not blocked.promote
    assert blocked.reason == ("exact_match: tuned 0.7500 < base 0.2500 + 0.5100 = 0.7600: keep the current latest")


def test_tuned_must_not_regress_the_published_model_beyond_max_regression():
    published = ModelScores(score=0.85, loss=0.4)
    passed = promotion_gate("rougeL", BASE, TUNED, published, max_regression=0.1)
    assert passed.promote and passed.details["published_score"] == 0.85
    assert passed.gate == "score>=base+min_improvement, score>=published-max_regression"
    blocked = promotion_gate("rougeL", BASE, TUNED, published, max_regression=0.05)
    assert not blocked.promote and "tuned 0.7500 < published 0.8500 - 0.0500" in blocked.reason
    # Nothing published yet: the check is not made.
    assert promotion_gate("rougeL", BASE, TUNED, None, max_regression=0.0).gate == "score>=base+min_improvement"


def test_eval_loss_increase_is_gated_when_asked_and_nan_never_passes():
    worse_loss = ModelScores(score=0.75, loss=2.3)
    assert promotion_gate("exact_match", BASE, worse_loss, max_eval_loss_increase=0.5).promote
    assert not promotion_gate("exact_match", BASE, worse_loss, max_eval_loss_increase=0.2).promote
    assert not promotion_gate("exact_match", BASE, ModelScores(score=1.0, loss=math.nan),
                              max_eval_loss_increase=10.0).promote


def test_every_check_is_recorded():
    decision = promotion_gate("exact_match", BASE, TUNED, ModelScores(score=0.9, loss=0.3), min_improvement=0.1,
                              max_regression=0.1, max_eval_loss_increase=0.0)
    assert [c["passed"] for c in decision.details["checks"]] == [True, False, True]
    assert not decision.promote and decision.reason.count(";") == 0  # only the failed check is named


def test_settings_add_the_headline_module_and_reject_bad_thresholds():
    assert EvaluationSettings(metric="rougeL").metrics == ["exact_match", "rouge"]
    assert EvaluationSettings(metric="chrf", metrics=["chrf", "bleu"]).metrics == ["chrf", "bleu"]
    with pytest.raises(ValidationError) as error:
        PublishSettings(max_regression=-0.1, max_eval_loss_increase=-1)
    assert "max_regression" in str(error.value) and "max_eval_loss_increase" in str(error.value)
    with pytest.raises(ValidationError, match="metric"):
        EvaluationSettings(metric="f1")
