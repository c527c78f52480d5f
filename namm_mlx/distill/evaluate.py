"""Held-out future-attention recall of any policy, replayed over one recording.

One full-cache pass per item serves every policy: each policy's caches replay
the recorded keys and queries of the document at the 512-token cadence under
its budget, its kept sets are taken after every step, and they are scored
against the attention the question and the rest of the text go on to pay
(:mod:`namm_mlx.eval.recall`). Replaying skips the model's forward, so a
policy costs only its own steps; the price is the one-shot approximation of
:mod:`namm_mlx.recording` (after the first eviction the online run would see
slightly different keys).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..cache import EvictingKVCache, evict_now
from ..eval.recall import FutureAttention, RecallResult, future_attention_from_caches, future_attention_recall, snapshot
from ..recording import RecordedLayer, record_full_cache, recorded_layers, replay
from .record import item_tokens


def replay_recall(
    layers: Sequence[RecordedLayer],
    scale: float,
    future: FutureAttention,
    make_cache: Callable[[], EvictingKVCache],
    step: int = 512,
) -> RecallResult:
    """Recall of the policy behind ``make_cache`` while the document is read."""
    trace = []

    def after_block(caches: list[EvictingKVCache]) -> None:
        if all(c.n_new == 0 for c in caches):
            trace.append(snapshot(caches))

    caches = replay(layers, scale, make_cache, upto=future.doc_length, step=step, on_block=after_block)
    if evict_now(caches):  # the step at the document's end, before the question
        trace.append(snapshot(caches))
    return future_attention_recall(future, trace)


def item_recalls(
    model: Any,
    tokenizer: Any,
    item: Mapping[str, Any],
    policies: Mapping[str, Callable[[int], EvictingKVCache]],
    step: int = 512,
) -> dict[str, RecallResult]:
    """Recall of every policy on ``item``. policies: name -> ``make_cache(doc_length)``
    (the document's length lets a budget be a share of it)."""
    tokens, doc_length = item_tokens(tokenizer, item)
    caches = record_full_cache(model, tokens, step, split=doc_length)
    layers, scale = recorded_layers(caches), caches[0].scale
    results = {}
    future = future_attention_from_caches(list(caches), doc_length, step)
    for name, factory in policies.items():
        results[name] = replay_recall(layers, scale, future, lambda: factory(doc_length), step)
    return results
