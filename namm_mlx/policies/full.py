"""No eviction: the full-cache reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ._baseline import NEVER, Baseline
from .base import EvictionContext, Scores


@dataclass(eq=False, repr=False)
class FullScorer(Baseline):
    """No eviction: the full-cache reference.

    Its interval is :data:`NEVER`, so the cache never steps (and never applies
    a budget); it needs no queries, so nothing is buffered. Do not call
    ``evict_now`` on a full cache with a budget: the cache would apply it.
    """

    name = "full"
    help = "no eviction: the full-cache reference"
    color = (70, 70, 70)
    takes_budget = False

    def __post_init__(self) -> None:
        self.one_shot = False
        self.interval = NEVER

    @classmethod
    def create(cls, namm: Any = None, **params: Any) -> "FullScorer":
        """``full`` never steps, so an ``interval`` given to it is ignored
        (handy when one loop builds every policy)."""
        params.pop("interval", None)
        return super().create(namm, **params)

    def score(self, context: EvictionContext) -> Scores:
        return Scores(mx.zeros(context.positions.shape, dtype=mx.float32))
