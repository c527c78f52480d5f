"""Percentile bootstrap intervals for the mean of per-item scores.

A table that ranks policies on a few dozen items needs to say how much each
mean could move with other items: resampling the items with replacement and
taking the 2.5th and 97.5th percentiles of the resampled means gives a 95%
interval without assuming a distribution (task scores are often 0/1). The seed
is fixed, so the same predictions always give the same interval.

A mean over tasks (the table's "(mean)" rows) is resampled per task
(stratified): each task keeps its item count, as it does in the real table.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95


def bootstrap_interval(
    groups: Sequence[Sequence[float]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """Interval of the mean over ``groups`` of each group's item mean.

    groups: per task, the item values (one group for a plain mean). Returns
    ``(low, high)``, or None when there are no items.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        return None
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples, dtype=np.float64)
    for values in groups:
        picks = rng.integers(0, len(values), size=(resamples, len(values)))
        means += values[picks].mean(axis=1)
    means /= len(groups)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)
