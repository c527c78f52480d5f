"""Record a full-cache pass once, then replay it through any policy's caches.

A full cache that also buffers every post-RoPE query holds everything an
eviction step looks at. Replaying those keys, values and queries through
fresh :class:`EvictingKVCache` layers, in the same 512-aligned blocks the
attention hook would feed, runs a policy's steps (attention recomputation,
features, scoring, selection) without the model's forward. Before the first
eviction this is exactly the online run; afterwards the online run's later
tokens would have been computed from the evicted cache, so a replay is the
one-shot approximation kvpress makes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx

from .cache import EvictingKVCache
from .integration import attach, detach
from .policies import FullScorer
from .prefill import prefill


class QueryRecorder(FullScorer):
    """Keeps every token and buffers every query."""

    needs_queries = True


def record_full_cache(
    model: Any, tokens: Sequence[int], step: int = 512, split: int | None = None
) -> list[EvictingKVCache]:
    """Run ``tokens`` through ``model`` with full, query-recording caches.

    split: feed ``tokens[:split]`` and the rest as two prefills (a document,
    then its question), so the chunks, and with them every float, are those of
    an online run that reads the document first.
    Returns the caches: per layer ``keys``/``values`` ``[1, H, T, D]`` and
    ``queries`` ``[1, Hq, T, D]`` (post-RoPE), nothing evicted.
    """
    attach(model, QueryRecorder(), probe=False)
    try:
        caches = model.make_cache()
        if not all(isinstance(c, EvictingKVCache) for c in caches):
            raise ValueError("recording needs a model whose every layer uses the evicting cache")
        parts = [tokens] if split is None else [tokens[:split], tokens[split:]]
        for part in parts:
            prefill(model, caches, part, step)
    finally:
        detach(model)
    return caches


#: (keys, values, queries) of one recorded layer, ``[1, H, T, D]`` / ``[1, Hq, T, D]``.
RecordedLayer = tuple[mx.array, mx.array, mx.array]


def recorded_layers(caches: Sequence[EvictingKVCache]) -> list[RecordedLayer]:
    """The live keys, values and queries of recorded caches."""
    return [(c.keys[:, :, : c.length], c.values[:, :, : c.length], c.queries[:, :, : c.num_queries]) for c in caches]


def replay(
    layers: Sequence[RecordedLayer],
    scale: float,
    make_cache: Callable[[], EvictingKVCache],
    upto: int | None = None,
    step: int = 512,
    on_block: Callable[[list[EvictingKVCache]], None] | None = None,
    layer_ids: Sequence[int] | None = None,
) -> list[EvictingKVCache]:
    """Fresh caches from ``make_cache`` fed the first ``upto`` recorded tokens in
    ``step``-aligned blocks, exactly as the attention hook feeds them (append,
    then observe the queries: steps fire where they would online).

    on_block: called with the caches after every block.
    layer_ids: each recorded layer's index in the model (default: all layers
    in order), given to caches built without one for per-layer scorers.
    """
    ids = range(len(layers)) if layer_ids is None else list(layer_ids)
    if len(ids) != len(layers):
        raise ValueError(f"{len(layers)} recorded layers but {len(ids)} layer ids")
    caches = [make_cache() for _ in layers]
    for cache, layer in zip(caches, ids):
        if cache.layer is None:
            cache.layer = layer
    total = layers[0][0].shape[2] if upto is None else upto
    done = 0
    while done < total:
        n = min(step - done % step, total - done)
        for cache, (keys, values, queries) in zip(caches, layers):
            cache.update_and_fetch(keys[:, :, done : done + n], values[:, :, done : done + n])
            cache.observe(queries[:, :, done : done + n], scale)
        mx.eval([c.state for c in caches])
        done += n
        if on_block is not None:
            on_block(caches)
    return caches
