"""A policy that is not built in, for tests/test_new_policy.py: one class.

It keeps the oldest tokens (the mirror image of a recency window), which is
easy to recognise in a cache's kept positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from namm_mlx.policies._baseline import DEFAULT_INTERVAL, Baseline
from namm_mlx.policies.base import EvictionContext, Scores


@dataclass(eq=False, repr=False)
class OldestScorer(Baseline):
    """Score = minus the position: the earliest tokens are kept."""

    name = "oldest"
    help = "the oldest tokens (a test policy)"
    color = (0, 200, 200)

    interval: int | None = DEFAULT_INTERVAL

    def score(self, context: EvictionContext) -> Scores:
        return Scores(-context.positions.astype(mx.float32))
