"""The NAMM as a scorer for the evicting cache: the reference eviction step."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ..cache import EvictionContext, Scores
from ..config import NAMMConfig
from ..namm import NAMM, TokenState
from ..selection import protect_newest, shared_keep_count


class NAMMScorer:
    """Scores with a NAMM; keeps K = max over heads of the tokens scoring >= 0.

    Carried per-token state: the 16-sample attention tail and the 17-bin EMA
    (positions are kept by the cache itself).
    """

    name = "namm"
    needs_queries = True

    def __init__(self, namm: NAMM) -> None:
        self.namm = namm
        self.interval = namm.config.update_interval
        self.granularity = namm.config.hop

    def score(self, context: EvictionContext) -> Scores:
        attn = context.attention(dtype=self.namm.config.attention_dtype)
        carried = None
        if context.state:
            n_old = context.positions.shape[-1] - context.n_new
            carried = TokenState(context.positions[..., :n_old], *context.state)
        scores, state, _, _ = self.namm.score(attn, context.positions, carried)
        keep = shared_keep_count(protect_newest(scores), self.namm.config.threshold)
        return Scores(scores, [state.attn_tail, state.ema], keep)

    def spec(self) -> dict[str, Any]:
        return {"policy": self.name, "config": self.namm.config.to_dict()}

    def arrays(self) -> dict[str, mx.array]:
        return {
            "namm_vector": mx.array(self.namm.to_flat()),
            "namm_norm_mean": self.namm.norm_mean,
            "namm_norm_var": self.namm.norm_var,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], arrays: dict[str, mx.array]) -> "NAMMScorer":
        config = NAMMConfig.from_dict(spec["config"])
        namm = NAMM.from_flat(
            np.asarray(arrays["namm_vector"]),
            np.asarray(arrays["namm_norm_mean"]),
            np.asarray(arrays["namm_norm_var"]),
            config,
        )
        return cls(namm)
