"""The local evaluate metric modules on known inputs, offline (no Hub: HF_HUB_OFFLINE is set)."""
import json

import pytest

from tasks.scoring.metrics import SCORES, compute_metrics, module_of


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_exact_match_ignores_case_punctuation_and_spacing():
    scores = compute_metrics(["exact_match"], ["41 days.", "  The Q7's battery:  41 days! ", "no"],
                             ["41 Days", "the q7 s battery 41 days", "yes"])
    assert scores == {"exact_match": pytest.approx(2 / 3)}


def test_rouge_on_known_inputs():
    scores = compute_metrics(["rouge"], ["the cat sat on the mat", "completely different"],
                             ["the cat sat on the mat", "the cat is here"])
    assert scores["rouge1"] == pytest.approx(0.5)  # one perfect row, one with no shared word
    # "the cat lay on a mat" vs "the cat sat on the mat": 4 of 6 unigrams shared; LCS "the cat on mat" = 4
    partial = compute_metrics(["rouge"], ["the cat lay on a mat"], ["the cat sat on the mat"])
    assert partial["rouge1"] == pytest.approx(4 / 6) and partial["rougeL"] == pytest.approx(4 / 6)
    assert partial["rouge2"] == pytest.approx(1 / 5)  # only "the cat" of 5 bigrams


def test_chrf_and_bleu_are_one_on_identity_and_lower_otherwise():
    references = ["The Q7 weighs 173 grams.", "Its battery lasts 41 days on one charge."]
    same = compute_metrics(["chrf", "bleu"], references, references)
    assert same == {"chrf": pytest.approx(1.0), "bleu": pytest.approx(1.0)}
    worse = compute_metrics(["chrf", "bleu"], ["The Q7 weighs 200 grams.", "The battery lasts a week."], references)
    assert 0 < worse["chrf"] < 0.8 and 0 <= worse["bleu"] < worse["chrf"]


def test_json_validity_and_match():
    reference = json.dumps({"name": "Q7", "grams": 173})
    predictions = ['{"grams": 173, "name": "Q7"}',  # same object, other key order
                   '```json\n{"name": "Q7", "grams": 170}\n```',  # valid in a fence, wrong value
                   '{"name": "Q7", grams: 173}']  # not JSON
    scores = compute_metrics(["json_valid"], predictions, [reference] * 3)
    assert scores == {"json_valid": pytest.approx(2 / 3), "json_match": pytest.approx(1 / 3)}


def test_several_modules_at_once_and_mismatched_inputs():
    scores = compute_metrics(["exact_match", "rouge", "exact_match"], ["a b"], ["a b"])
    assert list(scores) == ["exact_match", "rouge1", "rouge2", "rougeL"] and scores["exact_match"] == 1.0
    assert compute_metrics(["bleu", "json_valid"], [], []) == {"bleu": 0.0, "json_valid": 0.0, "json_match": 0.0}
    with pytest.raises(ValueError, match="1 predictions for 0 references"):
        compute_metrics(["exact_match"], ["a"], [])


def test_every_score_names_its_module():
    assert {module_of(score) for scores in SCORES.values() for score in scores} == set(SCORES)
    with pytest.raises(ValueError, match="unknown score 'f1'"):
        module_of("f1")
