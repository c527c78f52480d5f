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

from typing import Callable, Sequence

from ..cache import EvictingKVCache
from ..eval.query_agnostic import replay_kept_sets
from ..eval.recall import FutureAttention, RecallResult, future_attention_recall
from ..recording import RecordedLayer


def replay_recall(
    layers: Sequence[RecordedLayer],
    scale: float,
    future: FutureAttention,
    make_cache: Callable[[], EvictingKVCache],
    step: int = 512,
    layer_ids: Sequence[int] | None = None,
) -> RecallResult:
    """Recall of the policy behind ``make_cache`` while the document is read;
    ``layer_ids``: the recorded layers' indices in the model (default: all, in order)."""
    trace, _ = replay_kept_sets(layers, scale, make_cache, future.doc_length, step, layer_ids)
    return future_attention_recall(future, trace)
