import math

import pytest

from fromfeedback.stats import calibration_bins, expected_calibration_error, pairwise_accuracy, similar_length, wilson_interval


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # stays inside [0, 1], unlike p ± 1.96·se
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_expected_calibration_error_by_hand():
    # Bin [0.2, 0.3): predictions 0.2, 0.2 with outcomes 0, 1 → |0.5 − 0.2| = 0.3 on 2 of 4.
    # Bin [0.9, 1.0]: predictions 0.9, 1.0 with outcomes 1, 1 → |1 − 0.95| = 0.05 on 2 of 4.
    probs, labels = [0.2, 0.2, 0.9, 1.0], [0, 1, 1, 1]
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)
    rows = calibration_bins(probs, labels, bins=10)
    assert [r["count"] for r in rows] == [2, 2] and rows[1]["high"] == 1.0
    assert expected_calibration_error([0.5] * 4, [0, 1, 0, 1]) == 0.0


def test_similar_length_is_relative_to_the_longer_text():
    assert similar_length("a" * 100, "a" * 81)
    assert not similar_length("a" * 100, "a" * 80)  # exactly 20% shorter is not "less than 20%"
    assert similar_length(81, 100) and not similar_length(100, 79)
    assert similar_length("", "")


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy([2.0, 1.0, 0.0, 5.0], [1.0, 2.0, 0.0, 4.0]) == pytest.approx(2.5 / 4)
    assert math.isnan(pairwise_accuracy([], []))
