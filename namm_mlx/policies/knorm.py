"""Key-norm eviction: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._baseline import DEFAULT_INTERVAL, Baseline
from .base import EvictionContext, Scores


@dataclass(eq=False, repr=False)
class KNormScorer(Baseline):
    """Key-norm eviction (Devoto et al., arXiv 2406.11430; kvpress ``KnormPress``).

    Score = -||key||_2: keys with a low L2 norm tend to receive high attention,
    so they are kept. Needs no queries.

    Simplified: applied at the shared cadence on post-RoPE keys (RoPE is a
    rotation, so norms are unchanged).
    """

    name = "knorm"
    help = "key norm: the keys with the smallest L2 norm"
    color = (140, 86, 75)

    interval: int | None = DEFAULT_INTERVAL

    def score(self, context: EvictionContext) -> Scores:
        keys = context.keys.astype(mx.float32)
        return Scores(-mx.sqrt((keys * keys).sum(axis=-1)))
