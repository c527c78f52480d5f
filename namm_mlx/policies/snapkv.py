"""SnapKV: attention from an observation window, pooled over neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ._baseline import Baseline
from .base import EvictionContext, Scores


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


@dataclass(eq=False, repr=False)
class SnapKVScorer(Baseline):
    """SnapKV (Li et al., arXiv 2404.14469): observation-window attention.

    Score of a prefix token = attention from the last ``window`` queries,
    averaged over those rows, then pooled over the token axis (``kernel``
    wide, stride 1, "same" padding; ``pooling`` "max" or "avg") so that
    neighbours of important tokens survive too. The window's own tokens are
    always kept (scored above the prefix, newest highest).

    One-shot by default (``interval=None``), as SnapKV compresses once after
    prefill. With an integer ``interval`` it re-scores at that cadence too (a
    decoding variant, like kvpress's ``DecodingPress`` around ``SnapKVPress``).

    Simplified: the budget is the cache's (the original keeps ``capacity``
    tokens per head, including the window); attention is the GQA mean per KV
    head (kvpress also averages over the group). The original's default
    pooling is average; ``max`` is the variant the paper also describes.
    """

    name = "snapkv"
    help = "SnapKV: attention from the prompt's last queries, pooled (one-shot by default)"
    color = (255, 127, 14)
    one_shot_default = True
    needs_queries = True

    window: int = 32
    kernel: int = 5
    pooling: str = "max"
    interval: int | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        self.window, self.kernel = int(self.window), int(self.kernel)
        self.query_rows = self.window  # the cache need not buffer older queries
        super().__post_init__()

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
