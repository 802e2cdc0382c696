"""Statistical helpers shared by the reward model and evaluation stages (each lives here once)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion of `successes` out of `n`.

    `successes` may be fractional (a sum of preference probabilities in [0, 1]); the interval is then
    conservative, since such a mean varies less than a mean of 0/1 outcomes with the same average.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def calibration_bins(probs: Sequence[float], labels: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins of predicted probability: count, mean prediction and observed frequency of each non-empty bin."""
    probs_array, labels_array = np.asarray(probs, dtype=float), np.asarray(labels, dtype=float)
    # Bin b holds [b/bins, (b+1)/bins); a probability of exactly 1 goes to the last bin.
    which = np.minimum((probs_array * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append({"low": b / bins, "high": (b + 1) / bins, "count": int(inside.sum()),
                         "mean_prob": float(probs_array[inside].mean()), "frequency": float(labels_array[inside].mean())})
    return rows


def expected_calibration_error(probs: Sequence[float], labels: Sequence[float], bins: int = 10) -> float:
    """Σ_bins (bin size / n) · |observed frequency − mean predicted probability| over equal-width bins."""
    n = len(probs)
    if n == 0:
        return 0.0
    return float(sum(row["count"] / n * abs(row["frequency"] - row["mean_prob"]) for row in calibration_bins(probs, labels, bins)))


def similar_length(a: str | int, b: str | int, tolerance: float = 0.2) -> bool:
    """True when two texts (or character counts) differ in length by less than `tolerance` of the longer one."""
    length_a = a if isinstance(a, int) else len(a)
    length_b = b if isinstance(b, int) else len(b)
    longer = max(length_a, length_b)
    return longer == 0 or abs(length_a - length_b) < tolerance * longer


def pairwise_accuracy(score_chosen: Sequence[float], score_rejected: Sequence[float]) -> float:
    """Fraction of pairs where the chosen item scores higher; a tie counts as half (a coin flip)."""
    chosen, rejected = np.asarray(score_chosen, dtype=float), np.asarray(score_rejected, dtype=float)
    if len(chosen) == 0:
        return float("nan")
    return float(((chosen > rejected) + 0.5 * (chosen == rejected)).mean())
