import pytest

from tasks.metrics import exact_match, normalize_answer


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert normalize_answer("  The Q7's battery:  41 days! ") == "the q7 s battery 41 days"


def test_exact_match_on_known_inputs():
    assert exact_match(["41 days.", "173 grams", "no"], ["41 Days", "173 grams.", "yes"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])
