"""Baseline eviction policies as scorers for the one evicting cache.

Each class implements the :class:`namm_mlx.cache.Scorer` protocol: it only
turns an :class:`EvictionContext` into per-token scores (higher = keep). The
cache owns storage, the gather, the budget (``max_kv_size`` /
``keep_fraction``) and the cadence, so every baseline returns ``keep=None``
and runs at the same cadence as the NAMM by default (``interval=512``), which
makes comparisons fair: only the choice of tokens differs. With
``interval=None`` a policy is one-shot instead: it compresses once, when the
caller runs ``evict_now`` after the prompt (how kvpress applies its presses).

Common simplifications against the papers (each class lists its own):

* The budget is per layer and equal for every head of a layer (the cache's
  invariant), taken from ``keep_fraction`` / ``max_kv_size``.
* Policies that evict at every decoding step in the original run at the
  shared cadence here: the cache grows by up to ``interval`` tokens between
  steps.
* Attention is the GQA mean over the query heads that share a KV head
  (``EvictionContext.attention``); the originals are mostly MHA.
* "Protected" tokens (sinks, recent windows) get finite scores above every
  unprotected one, ordered by recency, rather than ``+inf``: if the budget is
  smaller than the protected set, the most relevant protected tokens win
  instead of an arbitrary tie-break.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..cache import EvictionContext, Scores

#: ``interval`` of a policy that never steps on its own (full, one-shot SnapKV).
NEVER = 1 << 62

DEFAULT_INTERVAL = 512


def _check_interval(interval: int) -> int:
    interval = int(interval)
    if interval < 1:
        raise ValueError(f"interval must be at least 1, got {interval}")
    return interval


class _Baseline:
    """Shared plumbing: the name, the cadence, rebuilding from a spec, no arrays.

    ``interval=None`` makes a policy one-shot: the cache never steps on its own
    and the caller compresses once with ``evict_now`` (after the prompt), as
    kvpress applies its presses.
    """

    name = ""
    needs_queries = False
    granularity = 1
    interval = DEFAULT_INTERVAL
    one_shot = False

    def _set_interval(self, interval: int | None) -> None:
        self.one_shot = interval is None
        self.interval = NEVER if interval is None else _check_interval(interval)

    @property
    def interval_param(self) -> int | None:
        return None if self.one_shot else self.interval

    def params(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this scorer (JSON-able)."""
        return {"interval": self.interval_param}

    def spec(self) -> dict[str, Any]:
        return {"policy": self.name, **self.params()}

    def arrays(self) -> dict[str, mx.array]:
        return {}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], arrays: dict[str, mx.array]) -> "_Baseline":
        return cls(**{k: v for k, v in spec.items() if k != "policy"})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class FullScorer(_Baseline):
    """No eviction: the full-cache reference.

    Its interval is :data:`NEVER`, so the cache never steps (and never applies
    a budget); it needs no queries, so nothing is buffered. Do not call
    ``evict_now`` on a full cache with a budget: the cache would apply it.
    """

    name = "full"
    interval = NEVER

    def params(self) -> dict[str, Any]:
        return {}

    def score(self, context: EvictionContext) -> Scores:
        return Scores(mx.zeros(context.positions.shape, dtype=mx.float32))


class StreamingScorer(_Baseline):
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

    def __init__(self, sinks: int = 4, interval: int | None = DEFAULT_INTERVAL) -> None:
        if sinks < 0:
            raise ValueError(f"sinks must be non-negative, got {sinks}")
        self.sinks = int(sinks)
        self._set_interval(interval)

    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "interval": self.interval_param}

    def score(self, context: EvictionContext) -> Scores:
        pos = context.positions.astype(mx.float32)
        sink_score = float(context.offset + self.sinks) - pos  # > offset > any position
        return Scores(mx.where(context.positions < self.sinks, sink_score, pos))


class H2OScorer(_Baseline):
    """H2O heavy hitters (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

    Score = attention each token has received, summed over every query since
    it entered the cache (carried as per-token state; new tokens start at 0
    and first collect the attention of their own block's queries). The
    ``recent_window`` most recent tokens are protected (scored above every
    heavy hitter, newest highest).

    Simplified: the original evicts greedily at every decoding step with a
    budget split into heavy-hitter and recent halves; here eviction runs at
    the shared cadence, the budget comes from the cache, and the recent part is
    a fixed ``recent_window`` tokens. Attention is the GQA mean per KV head.
    kvpress's ``ObservedAttentionPress`` divides the sum by the number of
    queries that could see the token; we keep H2O's plain sum.
    """

    name = "h2o"
    needs_queries = True

    def __init__(
        self, recent_window: int = 64, interval: int | None = DEFAULT_INTERVAL, retain_queries: int = 0
    ) -> None:
        if recent_window < 0:
            raise ValueError(f"recent_window must be non-negative, got {recent_window}")
        if retain_queries < 0:
            raise ValueError(f"retain_queries must be non-negative, got {retain_queries}")
        self.recent_window = int(recent_window)
        self.retain_queries = int(retain_queries)
        self._set_interval(interval)

    def params(self) -> dict[str, Any]:
        params = {"recent_window": self.recent_window, "interval": self.interval_param}
        if self.retain_queries:
            params["retain_queries"] = self.retain_queries
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
        # Each query row sums to 1, so accumulated <= offset; protected scores
        # start above that and grow with position.
        pos = context.positions.astype(mx.float32)
        recent = context.positions >= context.offset - self.recent_window
        scores = mx.where(recent, float(context.offset + 1) + pos, accumulated)
        return Scores(scores, [accumulated])


def _pool(x: mx.array, kernel: int, pooling: str) -> mx.array:
    """1-D pooling over the last axis, stride 1, "same" padding (odd kernel)."""
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    half = kernel // 2
    n = x.shape[-1]
    pad_value = float("-inf") if pooling == "max" else 0.0
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], constant_values=pad_value)
    windows = mx.stack([padded[..., i : i + n] for i in range(kernel)], axis=0)
    if pooling == "max":
        return windows.max(axis=0)
    return windows.sum(axis=0) / kernel  # zero padding counted, like avg_pool1d


class SnapKVScorer(_Baseline):
    """SnapKV (Li et al., arXiv 2404.14469): observation-window attention.

    Score of a prefix token = attention from the last ``window`` queries,
    averaged over those rows, then pooled over the token axis (``kernel``
    wide, stride 1, "same" padding; ``pooling`` "max" or "avg") so that
    neighbours of important tokens survive too. The window's own tokens are
    always kept (scored above the prefix, newest highest).

    One-shot by default (``interval=None``, see :class:`_Baseline`), as SnapKV
    compresses once after prefill. With an integer ``interval`` it re-scores
    at that cadence too (a decoding variant, like kvpress's ``DecodingPress``
    around ``SnapKVPress``).

    Simplified: the budget is the cache's (the original keeps ``capacity``
    tokens per head, including the window); attention is the GQA mean per KV
    head (kvpress also averages over the group). The original's default
    pooling is average; ``max`` is the variant the paper also describes.
    """

    name = "snapkv"
    needs_queries = True

    def __init__(
        self, window: int = 32, kernel: int = 5, pooling: str = "max", interval: int | None = None
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {kernel}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.window = int(window)
        self.query_rows = self.window  # the cache need not buffer older queries
        self.kernel = int(kernel)
        self.pooling = pooling
        self._set_interval(interval)

    def params(self) -> dict[str, Any]:
        return {"window": self.window, "kernel": self.kernel, "pooling": self.pooling, "interval": self.interval_param}

    def score(self, context: EvictionContext) -> Scores:
        N = context.positions.shape[-1]
        buffered = context.queries.shape[2]
        attn = context.attention(rows=min(self.window, buffered))  # [B, H, rows, N]
        n_prefix = max(0, N - self.window)
        prefix = _pool(attn[..., :n_prefix].mean(axis=2), self.kernel, self.pooling)  # <= 1
        B, H = prefix.shape[:2]
        window = 2.0 + mx.arange(N - n_prefix, dtype=mx.float32)  # above any attention
        window = mx.broadcast_to(window, (B, H, N - n_prefix))
        return Scores(mx.concatenate([prefix, window], axis=-1))


class TOVAScorer(_Baseline):
    """TOVA (Oren et al., arXiv 2401.06104): token omission via attention.

    Score = attention of the newest query only, averaged over all heads of
    the layer, so every head keeps the same tokens (as TOVA does).

    Simplified: the original drops the single lowest-scoring token at every
    decoding step once a fixed budget is full; here the cache keeps the budget
    at the shared cadence (one top-k per step instead of greedy one-by-one
    removal, so scores of tokens dropped together come from one query).
    """

    name = "tova"
    needs_queries = True
    query_rows = 1  # only the last query matters

    def __init__(self, interval: int | None = DEFAULT_INTERVAL) -> None:
        self._set_interval(interval)

    def score(self, context: EvictionContext) -> Scores:
        attn = context.attention(rows=1)[:, :, 0]  # [B, H, N], GQA mean
        shared = attn.mean(axis=1, keepdims=True)  # mean over KV heads = over all query heads
        return Scores(mx.broadcast_to(shared, attn.shape))


class KNormScorer(_Baseline):
    """Key-norm eviction (Devoto et al., arXiv 2406.11430; kvpress ``KnormPress``).

    Score = -||key||_2: keys with a low L2 norm tend to receive high attention,
    so they are kept. Needs no queries.

    Simplified: applied at the shared cadence on post-RoPE keys (RoPE is a
    rotation, so norms are unchanged).
    """

    name = "knorm"

    def __init__(self, interval: int | None = DEFAULT_INTERVAL) -> None:
        self._set_interval(interval)

    def score(self, context: EvictionContext) -> Scores:
        keys = context.keys.astype(mx.float32)
        return Scores(-mx.sqrt((keys * keys).sum(axis=-1)))


class RandomScorer(_Baseline):
    """Random eviction (the kvpress ``RandomPress`` control).

    Uniform scores from ``mx.random.key(seed + offset)``: deterministic for a
    given seed and step, independent of the content (every layer of a model
    draws the same scores at the same step).
    """

    name = "random"

    def __init__(self, seed: int = 0, interval: int | None = DEFAULT_INTERVAL) -> None:
        self.seed = int(seed)
        self._set_interval(interval)

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed, "interval": self.interval_param}

    def score(self, context: EvictionContext) -> Scores:
        key = mx.random.key(self.seed + context.offset)
        return Scores(mx.random.uniform(shape=context.positions.shape, key=key))


BASELINES = (FullScorer, StreamingScorer, H2OScorer, SnapKVScorer, TOVAScorer, KNormScorer, RandomScorer)

__all__ = [
    "BASELINES",
    "NEVER",
    "FullScorer",
    "H2OScorer",
    "KNormScorer",
    "RandomScorer",
    "SnapKVScorer",
    "StreamingScorer",
    "TOVAScorer",
]
