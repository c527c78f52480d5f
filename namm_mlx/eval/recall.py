"""Future-attention recall: how much of the attention still to come lands on kept tokens.

A task score says whether one answer survived eviction; recall says, densely
and per token, whether a policy kept what the model goes on to look at. At an
eviction step at offset ``t`` a layer's KV head keeps a set ``K`` of the ``t``
tokens seen. The queries that follow (the rest of the document, then the
question and the teacher-forced answer) put attention ``F[j]`` on each token
``j < t`` when the model runs with the *full* cache. Recall at that step is

    sum_{j in K} F[j] / sum_{j < t} F[j]

averaged over KV heads, layers and steps. It needs one full-cache pass per
item (shared by every policy) and each policy's kept positions after each step.

The full pass stores, per layer, the column sums of the GQA-averaged attention
of every ``step``-long block of queries (``[H, blocks, T]``), never the
``T x T`` matrix: the future attention of a step is a sum of block rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..attention import attention_probabilities
from ..cache import EvictingKVCache
from ..files import atomic_write
from ..prefill import prefill
from ..recording import RecordedLayer, record_full_cache


@dataclass
class FutureAttention:
    """Column sums of the full cache's attention, per query block.

    block_sums: per layer ``[H, n_blocks, T]`` float32; block ``b`` holds the
    summed GQA-averaged attention of queries ``[b*step, (b+1)*step)`` (the last
    block may be shorter) over the ``T`` tokens. block_max: the same with the
    maximum over the block's queries instead of the sum.
    doc_length: tokens of the document part (queries from here on are the
    question and answer).
    """

    block_sums: list[np.ndarray]
    block_max: list[np.ndarray]
    step: int
    length: int
    doc_length: int

    @property
    def num_layers(self) -> int:
        return len(self.block_sums)

    @property
    def edges(self) -> list[int]:
        """Query block boundaries (see :func:`block_edges`)."""
        return block_edges(self.length, self.doc_length, self.step)

    def _block_of(self, upto: int) -> int:
        try:
            return self.edges.index(upto)
        except ValueError:
            raise ValueError(f"{upto} is not a query block boundary ({self.step}-token blocks and the document end)") from None

    def future(self, layer: int, upto: int) -> np.ndarray:
        """``[H, upto]``: attention that queries at ``>= upto`` put on tokens ``< upto``."""
        first = self._block_of(upto)
        return self.block_sums[layer][:, first:, :upto].sum(axis=1)

    def question(self, layer: int, upto: int, reduce: str = "sum") -> np.ndarray:
        """``[H, upto]``: attention from the question and answer queries only."""
        first = self._block_of(self.doc_length)
        blocks = (self.block_sums if reduce == "sum" else self.block_max)[layer][:, first:, :upto]
        return blocks.sum(axis=1) if reduce == "sum" else blocks.max(axis=1)


def block_edges(length: int, doc_length: int, step: int) -> list[int]:
    """Query block boundaries: every multiple of ``step``, plus the document end."""
    edges = sorted({*range(0, length, step), doc_length, length})
    return [e for e in edges if e <= length]


def record_future_attention(model: Any, tokens: Sequence[int], doc_length: int, step: int = 512) -> FutureAttention:
    """One full-cache pass over ``tokens`` (document, then question and answer)
    and the per-block column sums of its attention, layer by layer."""
    if not 0 < doc_length <= len(tokens):
        raise ValueError(f"doc_length {doc_length} must be in (0, {len(tokens)}]")
    caches = record_full_cache(model, tokens, step, split=doc_length)
    return future_attention_from_caches(caches, doc_length, step)


def future_attention_from_caches(
    caches: Sequence[EvictingKVCache], doc_length: int, step: int = 512, layers: Sequence[int] | None = None
) -> FutureAttention:
    """Block column sums from recorded full caches, for ``layers`` (all when
    None; the result's layer ``i`` is then ``layers[i]``)."""
    chosen = range(len(caches)) if layers is None else layers
    length = caches[0].offset
    edges = block_edges(length, doc_length, step)
    sums, maxes = [], []
    for i in chosen:
        cache = caches[i]
        keys, queries = cache.keys[:, :, : cache.length], cache.queries[:, :, : cache.num_queries]
        layer_sums, layer_max = [], []
        for start, stop in zip(edges[:-1], edges[1:]):
            # rows [start, stop) see keys [0, stop); later columns stay zero
            probs = attention_probabilities(queries[:, :, start:stop], keys[:, :, :stop], cache.scale)[0]
            pad = [(0, 0), (0, length - stop)]
            layer_sums.append(mx.pad(probs.sum(axis=1), pad))
            layer_max.append(mx.pad(probs.max(axis=1), pad))
        s, m = mx.stack(layer_sums, axis=1), mx.stack(layer_max, axis=1)
        mx.eval(s, m)
        sums.append(np.array(s))
        maxes.append(np.array(m))
    return FutureAttention(sums, maxes, step, length, doc_length)


def save_recording(path: str | os.PathLike, layers: Sequence[RecordedLayer], scale: float, future: FutureAttention) -> Path:
    """Write a recorded full pass (each layer's keys, values and queries, the
    attention scale, and the future attention of the same layers) to one
    ``.npz``, so every later policy replays it without the model's forward.
    numpy has no bfloat16: record in float32 or float16."""
    arrays = {"length": np.array(future.length), "doc_length": np.array(future.doc_length),
              "scale": np.array(scale), "step": np.array(future.step)}
    for i, (k, v, q) in enumerate(layers):
        arrays[f"{i}.k"], arrays[f"{i}.v"], arrays[f"{i}.q"] = np.array(k), np.array(v), np.array(q)
        arrays[f"{i}.s"], arrays[f"{i}.m"] = future.block_sums[i], future.block_max[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_recording(path: str | os.PathLike) -> tuple[list[RecordedLayer], float, FutureAttention]:
    """``(layers, scale, future)`` as :func:`save_recording` wrote them."""
    with np.load(path) as d:
        n = sum(1 for name in d.files if name.endswith(".k"))
        layers = [tuple(mx.array(d[f"{i}.{k}"]) for k in ("k", "v", "q")) for i in range(n)]
        step = int(d["step"]) if "step" in d.files else 512
        future = FutureAttention([d[f"{i}.s"] for i in range(n)], [d[f"{i}.m"] for i in range(n)],
                                 step, int(d["length"]), int(d["doc_length"]))
        return layers, float(d["scale"]), future


# --------------------------------------------------------------------------- kept sets


@dataclass
class KeptSnapshot:
    """Every layer's kept positions right after an eviction step at ``offset``.

    kept: per layer ``[H, K]`` int positions (all ``< offset``).
    """

    offset: int
    kept: list[np.ndarray]


def snapshot(caches: Sequence[Any]) -> KeptSnapshot:
    """Kept positions of every evicting layer, taken right after a step (so
    every slot is one the step decided on)."""
    kept = []
    offset = None
    for cache in caches:
        if not isinstance(cache, EvictingKVCache):
            continue
        if cache.n_new:
            raise ValueError("a kept-set snapshot must be taken right after a step (the cache holds new tokens)")
        kept.append(np.array(cache.kept_positions[0]).astype(np.int64))
        offset = cache.offset if offset is None else offset
    if offset is None:
        raise ValueError("no evicting cache to take a snapshot of")
    return KeptSnapshot(offset, kept)


def prefill_with_trace(model: Any, caches: list[Any], tokens: Sequence[int], step: int = 512) -> list[KeptSnapshot]:
    """:func:`namm_mlx.prefill.prefill` that snapshots the kept positions after
    every chunk whose end triggered a step on every layer."""
    trace: list[KeptSnapshot] = []

    def after_chunk(done: int, total: int) -> None:
        layers = [c for c in caches if isinstance(c, EvictingKVCache)]
        if layers and all(c.n_new == 0 for c in layers):
            trace.append(snapshot(layers))

    prefill(model, caches, tokens, step, on_chunk=after_chunk)
    return trace


# --------------------------------------------------------------------------- the metric


@dataclass
class RecallResult:
    """Recall averaged over heads; ``per_step[s][l]`` for snapshot ``s`` and layer ``l``."""

    per_step_layer: np.ndarray  # [S, L]
    offsets: list[int]
    question_per_step_layer: np.ndarray | None = None  # same, from question/answer queries only
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(self.per_step_layer.mean()) if self.per_step_layer.size else float("nan")

    @property
    def final(self) -> float:
        return float(self.per_step_layer[-1].mean()) if self.per_step_layer.size else float("nan")

    @property
    def question_final(self) -> float:
        q = self.question_per_step_layer
        return float(q[-1].mean()) if q is not None and q.size else float("nan")

    @property
    def per_layer(self) -> np.ndarray:
        return self.per_step_layer.mean(axis=0)

    @property
    def per_step(self) -> list[float]:
        return [float(v) for v in self.per_step_layer.mean(axis=1)]


def kept_share(attention: np.ndarray, kept: np.ndarray) -> float:
    """Mean over heads of the share of ``attention`` ``[H, t]`` on ``kept`` ``[H, K]``."""
    total = attention.sum(axis=-1)
    on_kept = np.take_along_axis(attention, kept, axis=-1).sum(axis=-1)
    share = np.where(total > 0, on_kept / np.maximum(total, 1e-30), 1.0)
    return float(share.mean())


def future_attention_recall(future: FutureAttention, trace: Sequence[KeptSnapshot]) -> RecallResult:
    """Recall of every snapshot against the full cache's future attention.

    Snapshots at the very end of the recording (nothing follows) are skipped.
    """
    rows, question_rows, offsets = [], [], []
    for snap in trace:
        if snap.offset >= future.length:
            continue
        if len(snap.kept) != future.num_layers:
            raise ValueError(f"snapshot has {len(snap.kept)} layers, the recording {future.num_layers}")
        rows.append([kept_share(future.future(l, snap.offset), k) for l, k in enumerate(snap.kept)])
        if snap.offset <= future.doc_length:
            question_rows.append(
                [kept_share(future.question(l, snap.offset), k) for l, k in enumerate(snap.kept)]
            )
        else:
            question_rows.append([np.nan] * future.num_layers)
        offsets.append(snap.offset)
    L = future.num_layers
    return RecallResult(
        np.asarray(rows, dtype=np.float64).reshape(-1, L),
        offsets,
        np.asarray(question_rows, dtype=np.float64).reshape(-1, L),
    )
