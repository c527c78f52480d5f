"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._baseline import DEFAULT_INTERVAL, Baseline, check_non_negative
from .base import EvictionContext, Scores


@dataclass(eq=False, repr=False)
class StreamingScorer(Baseline):
    """StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks + recency.

    Keeps the first ``sinks`` tokens and then the most recent ones; the score
    uses positions only. Sinks score above every other token (earliest
    highest), the rest score by position.

    Simplified: the original keeps a fixed window and evicts at every token,
    and assigns positions *within the cache* (re-rotating keys); here the
    window is the cache's budget, eviction runs at the shared cadence, and
    keys keep their original RoPE positions (as mlx-lm's ``RotatingKVCache``
    and kvpress's ``StreamingLLMPress`` also do).
    """

    name = "streaming"
    help = "StreamingLLM: the first tokens (sinks) and the most recent ones"
    color = (148, 103, 189)

    sinks: int = 4
    interval: int | None = DEFAULT_INTERVAL

    def __post_init__(self) -> None:
        self.sinks = check_non_negative("sinks", self.sinks)
        super().__post_init__()

    def score(self, context: EvictionContext) -> Scores:
        pos = context.positions.astype(mx.float32)
        sink_score = float(context.offset + self.sinks) - pos  # > offset > any position
        return Scores(mx.where(context.positions < self.sinks, sink_score, pos))
