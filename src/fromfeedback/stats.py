"""Statistical helpers shared by the reward model and evaluation stages (each lives here once)."""

from __future__ import annotations

import math


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
