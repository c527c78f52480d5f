"""The NAMM as a scorer for the evicting cache: the reference eviction step."""

from __future__ import annotations

import math
import os
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import NAMMConfig
from ..key_probe import layer_marks, probe_misfit, probe_scores, protect_marked, spread_marks
from ..namm import NAMM, TokenFeatures, TokenState
from ..selection import protect_newest, protect_recent, shared_keep_count
from .base import EvictionContext, Policy, Scores


#: Floor of the newest query's attention term, in units of uniform attention
#: (``1/N``): tokens it ignores all score ``log(1e-3)``, not minus infinity.
NEWEST_QUERY_EPS = 1e-3


def mix_newest_query(scores: mx.array, attn: mx.array, weight: float) -> mx.array:
    """``(1 - weight) * scores + weight * log(N * a + eps)`` with ``a`` the last
    row of ``attn`` ``[B, H, n, N]``: the attention the newest query pays each
    cached token, in units of uniform attention (0 for an average token)."""
    newest = attn[:, :, -1, :].astype(mx.float32)
    term = mx.log(newest * newest.shape[-1] + NEWEST_QUERY_EPS)
    return (1.0 - weight) * scores.astype(mx.float32) + weight * term


class NAMMScorer(Policy):
    """Scores with a NAMM; keeps K = max over heads of the tokens scoring >= 0.

    ranked: ignore the threshold and keep each head's top tokens up to the
    cache's budget (``max_kv_size`` / ``keep_fraction``), as the reference's
    ``TopKSelection`` with ``cache_size`` does. A fixed-budget comparison then
    asks only *which* tokens the NAMM keeps, never how many.

    Carried per-token state: the 16-sample attention tail and the 17-bin EMA
    (positions are kept by the cache itself), and with a key probe pooled over
    heads (``key_probe_heads``), each token's pooled probe score.
    """

    name = "namm"
    help = "the NAMM (--namm): a learned memory model, at its own threshold (ranked at a --budget)"
    color = (214, 39, 40)
    takes_budget = False
    needs_own_state = True
    needs_queries = True

    def __init__(self, namm: NAMM, ranked: bool = False) -> None:
        self.namm = namm
        self.ranked = bool(ranked)
        self.interval = namm.config.update_interval
        self.granularity = namm.config.hop
        #: per layer, the pooled probe scores of the tokens its last step
        #: took in, with that step's offset and the scores' shape
        self._layer_marks: dict[int, tuple[tuple[Any, ...], mx.array]] = {}

    @classmethod
    def create(cls, namm: Any = None, **params: Any) -> "NAMMScorer":
        """namm: a :class:`~namm_mlx.namm.NAMM`, a folder holding one, or a ready
        scorer (its cadence comes from its config). Its only parameter is
        ``ranked``: keep the top tokens up to the cache's budget."""
        ranked = bool(params.pop("ranked", False))
        if params:
            raise TypeError(
                f"the namm policy takes only ranked= (got {sorted(params)}); set the rest in its config"
            )
        if isinstance(namm, NAMMScorer):
            return namm if namm.ranked == ranked else NAMMScorer(namm.namm, ranked=ranked)
        if isinstance(namm, (str, os.PathLike)):
            namm = NAMM.load(namm)
        if not isinstance(namm, NAMM):
            raise TypeError(f"make_scorer('namm') needs namm= a NAMM or a NAMM folder, got {type(namm).__name__}")
        return cls(namm, ranked=ranked)

    @property
    def attention_dtype(self) -> str:
        """The rounding the cache applies to probabilities it takes from the forward."""
        return self.namm.config.attention_dtype

    def score(self, context: EvictionContext) -> Scores:
        attn, carried = self._inputs(context)
        scores, state, _, _ = self.namm.score(attn, context.positions, carried, self._keys(context))
        config = self.namm.config
        carry = [state.attn_tail, state.ema]
        marks = limit = None
        if self.namm.key_probe is not None:
            marks, limit, mark_state = self._marks_and_limit(scores, context)
            carry += mark_state

        def protected(s: mx.array) -> mx.array:
            if marks is not None:
                s = protect_marked(s, marks, config.threshold, limit)
            return protect_recent(s, context.positions, context.offset, config.recent_window, config.threshold)

        mixed = config.newest_query_weight > 0
        ranking = protected(mix_newest_query(scores, attn, config.newest_query_weight) if mixed else scores)
        if self.ranked:
            return Scores(ranking, carry, None)
        # the threshold was calibrated on the BAM's scores, so the BAM says how
        # many tokens pass it; the newest query's attention only reorders them
        counted = protected(scores) if mixed else ranking
        return Scores(ranking, carry, shared_keep_count(protect_newest(counted), config.threshold))

    def _marks_and_limit(self, scores: mx.array, context: EvictionContext) -> tuple[mx.array, int | None, list[mx.array]]:
        """The key probe's marks, how many of each head's surest marks are
        lifted (at most ``key_probe_share`` of the kept slots, or
        ``key_probe_document_share`` of the tokens read where that is more, up
        to half of the slots; None: all), and the marks' state to carry.

        At the threshold no budget says how many slots stay, so the BAM's own
        count is taken as the unmarked part: marks add at most
        ``share / (1 - share)`` of it, instead of every slot they mark.
        """
        config = self.namm.config
        room = context.budget
        if not self.ranked and config.key_probe_share < 1.0:
            plain = protect_recent(scores, context.positions, context.offset, config.recent_window, config.threshold)
            own = shared_keep_count(protect_newest(plain), config.threshold)
            own = math.floor(own / (1.0 - config.key_probe_share) + 1e-9)
            room = own if room is None else min(room, own)
        limit = None  # room for every slot: every mark keeps its place
        if room is not None and room < context.keys.shape[-2]:
            limit = math.floor(config.key_probe_share * room + 1e-9)
            floor = min(math.floor(config.key_probe_document_share * context.offset + 1e-9), room // 2)
            limit = max(limit, floor)
        marks, mark_state = self._marks(context)
        return marks, limit, mark_state

    def features(self, context: EvictionContext) -> TokenFeatures:
        """The token features of this step (no scoring)."""
        attn, carried = self._inputs(context)
        return self.namm.token_features(attn, context.positions, carried, self._keys(context))

    def _marks(self, context: EvictionContext) -> tuple[mx.array, list[mx.array]]:
        """The key probe's marks for this layer's slots (``>= 0``: keep first),
        spread over the span, and the per-slot state to carry (pooled scores)."""
        probe = self.namm.key_probe
        if context.layer is None:
            raise ValueError("this NAMM has a key probe, which is fitted per layer: the cache needs its layer index")
        heads, dim = context.keys.shape[1], context.keys.shape[-1]
        misfit = probe_misfit(probe, {(heads, dim)}, context.layer < probe.shape[0])
        if misfit:
            raise ValueError(f"{misfit}; layer {context.layer} has {heads} heads of dimension {dim} (another model?)")
        config = self.namm.config
        probe = probe[context.layer]
        if config.key_probe_heads == "own":
            return layer_marks(context.keys, probe, config.key_probe_span), []
        # New slots hold the same tokens in every head (each head's kept slots
        # differ), so this is the only time every head's key of a token is at hand.
        n_old = context.keys.shape[-2] - context.n_new
        new = probe_scores(context.keys[..., n_old:, :], probe)
        pooled = new.mean(axis=1, keepdims=True) if config.key_probe_heads == "mean" else new.max(axis=1, keepdims=True)
        if config.key_probe_layers == "mean":
            pooled = self._mean_over_lower_layers(pooled, context)
        raw = mx.broadcast_to(pooled, new.shape)
        if n_old:
            old = context.state[2] if len(context.state) > 2 else probe_scores(context.keys[..., :n_old, :], probe)
            raw = mx.concatenate([old, raw], axis=-1)
        return spread_marks(raw, config.key_probe_span), [raw]

    def _mean_over_lower_layers(self, pooled: mx.array, context: EvictionContext) -> mx.array:
        """The mean of ``pooled`` (this layer's scores of the step's new tokens)
        and the scores the layers below took for the same tokens in this forward.

        Layers step in order within a forward, so when this layer steps, every
        entry of a layer at or above it is from an earlier forward and is
        dropped, and a lower layer's entry counts only if it was taken at the
        same offset for as many new tokens: a cache list that steps alone (or
        a layer that did not step) falls back to the layers that did.
        """
        layer = context.layer
        for stale in [j for j in self._layer_marks if j >= layer]:
            del self._layer_marks[stale]
        step = (context.offset, tuple(pooled.shape))  # [B, 1, new slots]
        lower = [scores for taken, scores in self._layer_marks.values() if taken == step]
        self._layer_marks[layer] = (step, pooled)
        return sum(lower, pooled) / (len(lower) + 1) if lower else pooled

    def _keys(self, context: EvictionContext) -> mx.array | None:
        return context.keys if self.namm.config.key_norm_input else None

    def _inputs(self, context: EvictionContext) -> tuple[mx.array, TokenState | None]:
        """The step's attention and the old slots' carried state."""
        attn = context.attention(dtype=self.namm.config.attention_dtype)
        if not context.state:
            return attn, None
        n_old = context.positions.shape[-1] - context.n_new
        return attn, TokenState(context.positions[..., :n_old], *context.state[:2])

    def spec(self) -> dict[str, Any]:
        spec = {"policy": self.name, "config": self.namm.config.to_dict()}
        if self.ranked:
            spec["ranked"] = True
        return spec

    def arrays(self) -> dict[str, mx.array]:
        arrays = {
            "namm_vector": mx.array(self.namm.to_flat()),
            "namm_norm_mean": self.namm.norm_mean,
            "namm_norm_var": self.namm.norm_var,
        }
        if self.namm.key_probe is not None:
            arrays["namm_key_probe"] = self.namm.key_probe
        return arrays

    @classmethod
    def from_spec(cls, spec: dict[str, Any], arrays: dict[str, mx.array]) -> "NAMMScorer":
        config = NAMMConfig.from_dict(spec["config"])
        namm = NAMM.from_flat(
            np.asarray(arrays["namm_vector"]),
            np.asarray(arrays["namm_norm_mean"]),
            np.asarray(arrays["namm_norm_var"]),
            config,
            key_probe=arrays.get("namm_key_probe"),
        )
        return cls(namm, ranked=bool(spec.get("ranked", False)))
