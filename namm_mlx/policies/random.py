"""Random eviction: the content-blind control."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._baseline import DEFAULT_INTERVAL, Baseline
from .base import EvictionContext, Scores


@dataclass(eq=False, repr=False)
class RandomScorer(Baseline):
    """Random eviction (the kvpress ``RandomPress`` control).

    Uniform scores from ``mx.random.key(seed + offset)``: deterministic for a
    given seed and step, independent of the content (every layer of a model
    draws the same scores at the same step).
    """

    name = "random"
    help = "random scores (a control; seeded by --seed)"
    color = (227, 119, 194)
    seed_param = "seed"

    seed: int = 0
    interval: int | None = DEFAULT_INTERVAL

    def __post_init__(self) -> None:
        self.seed = int(self.seed)
        super().__post_init__()

    def score(self, context: EvictionContext) -> Scores:
        key = mx.random.key(self.seed + context.offset)
        return Scores(mx.random.uniform(shape=context.positions.shape, key=key))
