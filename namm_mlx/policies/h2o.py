"""H2O: heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..selection import protect_recent
from ._baseline import DEFAULT_INTERVAL, Baseline, check_non_negative
from .base import EvictionContext, Scores


@dataclass(eq=False, repr=False)
class H2OScorer(Baseline):
    """H2O heavy hitters (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

    Score = attention each token has received, summed over every query since
    it entered the cache (carried as per-token state; new tokens start at 0
    and first collect the attention of their own block's queries). The
    ``recent_window`` most recent tokens are protected (scored above every
    heavy hitter, newest highest). ``retain_queries``: see
    :class:`~namm_mlx.policies.base.Scorer`.

    Simplified: the original evicts greedily at every decoding step with a
    budget split into heavy-hitter and recent halves; here eviction runs at
    the shared cadence, the budget comes from the cache, and the recent part is
    a fixed ``recent_window`` tokens. Attention is the GQA mean per KV head.
    kvpress's ``ObservedAttentionPress`` divides the sum by the number of
    queries that could see the token; we keep H2O's plain sum.
    """

    name = "h2o"
    help = "H2O: the most attended tokens so far (heavy hitters) and a recent window"
    color = (31, 119, 180)
    needs_queries = True

    recent_window: int = 64
    interval: int | None = DEFAULT_INTERVAL
    retain_queries: int = 0

    def __post_init__(self) -> None:
        self.recent_window = check_non_negative("recent_window", self.recent_window)
        self.retain_queries = check_non_negative("retain_queries", self.retain_queries)
        super().__post_init__()

    def params(self) -> dict[str, Any]:
        params = super().params()
        if not self.retain_queries:  # the default stays out of specs, as in caches saved before it existed
            del params["retain_queries"]
        return params

    def score(self, context: EvictionContext) -> Scores:
        B, H, N = context.positions.shape
        n_old = N - context.n_new
        if context.state:
            carried = context.state[0].astype(mx.float32)
        else:
            carried = mx.zeros((B, H, n_old), dtype=mx.float32)
        fresh = mx.zeros((B, H, N - carried.shape[-1]), dtype=mx.float32)
        accumulated = mx.concatenate([carried, fresh], axis=-1)
        if context.new_queries:  # queries an earlier step already counted are skipped
            accumulated = accumulated + context.attention(rows=context.new_queries).sum(axis=2)
        scores = protect_recent(accumulated, context.positions, context.offset, self.recent_window, floor=0.0)
        return Scores(scores, [accumulated])
