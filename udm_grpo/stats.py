"""95% intervals of evaluation means.

For 0/1 values (strict correctness) the Agresti-Coull interval: with x successes of n,
p' = (x + 2) / (n + 4) and half-width 1.96 sqrt(p'(1 - p') / (n + 4)); otherwise the normal
interval 1.96 s / sqrt(n). A mean over T groups (GenEval's overall, a mean over tags) has
half-width sqrt(sum_t h_t^2) / T.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959964


def half_width(values) -> float:
    """95% half-width of the mean of `values` (a 1-D array or tensor); nan when it is undefined."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(v)
    if n == 0:
        return math.nan
    if np.isin(v, (0.0, 1.0)).all():
        p = (v.sum() + 2) / (n + 4)
        return float(Z95 * math.sqrt(p * (1 - p) / (n + 4)))
    return float(Z95 * v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def mean_of_groups_half_width(half_widths: list[float]) -> float:
    """Half-width of the mean of independent group means with the given half-widths."""
    return math.sqrt(sum(h * h for h in half_widths)) / len(half_widths) if half_widths else math.nan
