"""TOVA: the newest query's attention, shared by every head of a layer."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._baseline import DEFAULT_INTERVAL, Baseline
from .base import EvictionContext, Scores


@dataclass(eq=False, repr=False)
class TOVAScorer(Baseline):
    """TOVA (Oren et al., arXiv 2401.06104): token omission via attention.

    Score = attention of the newest query only, averaged over all heads of
    the layer, so every head keeps the same tokens (as TOVA does).

    Simplified: the original drops the single lowest-scoring token at every
    decoding step once a fixed budget is full; here the cache keeps the budget
    at the shared cadence (one top-k per step instead of greedy one-by-one
    removal, so scores of tokens dropped together come from one query).
    """

    name = "tova"
    help = "TOVA: the newest query's attention, averaged over the layer's heads"
    color = (44, 160, 44)
    needs_queries = True
    query_rows = 1  # only the last query matters

    interval: int | None = DEFAULT_INTERVAL

    def score(self, context: EvictionContext) -> Scores:
        attn = context.attention(rows=1)[:, :, 0]  # [B, H, N], GQA mean
        shared = attn.mean(axis=1, keepdims=True)  # mean over KV heads = over all query heads
        return Scores(mx.broadcast_to(shared, attn.shape))
