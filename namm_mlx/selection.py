"""Which cached tokens survive an eviction step (spec §4).

All heads of a layer keep the same number of tokens, so the cache stays one
dense ``[B, H, K, D]`` tensor and attention needs no per-head mask. Each head
keeps its own best tokens, in their original order.
"""

from __future__ import annotations

import mlx.core as mx

_FLOAT32_MAX = 3.4028234663852886e38


def protect_newest(scores: mx.array) -> mx.array:
    """Give the newest slot (last along the token axis) the largest score, so
    it is always kept: the next query needs at least one key."""
    scores = scores.astype(mx.float32)
    newest = mx.full((*scores.shape[:-1], 1), _FLOAT32_MAX, dtype=mx.float32)
    return mx.concatenate([scores[..., :-1], newest], axis=-1)


def protect_recent(scores: mx.array, positions: mx.array, offset: int, window: int, floor: float) -> mx.array:
    """Lift the ``window`` newest tokens (``positions >= offset - window``) above
    every other score and above ``floor`` (the threshold), newest highest, so a
    budget smaller than the window still keeps the newest first."""
    if window <= 0:
        return scores
    first = offset - window
    base = mx.maximum(mx.max(scores), floor) + 1.0
    lifted = base + (positions - first).astype(mx.float32)
    return mx.where(positions >= first, lifted, scores)


def shared_keep_count(scores: mx.array, threshold: float = 0.0) -> int:
    """Tokens every head keeps: the largest count of passing tokens over heads.

    scores: ``[..., H, N]`` (already protected). A token passes if
    ``score >= threshold``. This is one host sync, needed because the kept
    length is a shape.
    """
    passing = (scores >= threshold).sum(axis=-1)
    return int(passing.max().item())


def top_k_in_order(scores: mx.array, k: int) -> mx.array:
    """Indices of each head's ``k`` highest scores, ascending (original order).

    scores: ``[..., N]``. Returns int32 ``[..., k]``.
    """
    n = scores.shape[-1]
    if k >= n:
        return mx.broadcast_to(mx.arange(n, dtype=mx.int32), scores.shape)
    best = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    return mx.sort(best, axis=-1).astype(mx.int32)


def select_kept(scores: mx.array, threshold: float = 0.0, max_keep: int | None = None) -> mx.array:
    """The reference selection, with an optional hard budget.

    scores: ``[B, H, N]`` for one layer. K = max over heads (and batch) of the
    passing count; each head keeps its top-K (heads with fewer passing tokens
    keep their best failing ones); the newest token always stays. With
    ``max_keep``, K is capped (still keeping the newest).
    Returns int32 kept slot indices ``[B, H, K]``, ascending.
    """
    protected = protect_newest(scores)
    keep = shared_keep_count(protected, threshold)
    if max_keep is not None:
        keep = max(1, min(keep, int(max_keep)))
    return top_k_in_order(protected, keep)


def gather_tokens(x: mx.array, kept: mx.array) -> mx.array:
    """Gather per-head tokens: x ``[B, H, N, ...]``, kept ``[B, H, K]`` → ``[B, H, K, ...]``."""
    index = kept
    for _ in range(x.ndim - kept.ndim):
        index = index[..., None]
    return mx.take_along_axis(x, index, axis=kept.ndim - 1)
