"""Recompute the attention probabilities a memory step needs.

mlx's fused attention returns only its output, so at an eviction step we
recompute ``softmax(Q K^T * scale)`` for the buffered queries against the
current keys: every older slot visible, causal inside the new block. Storing
queries (``Hq x 512 x D`` per layer) is far cheaper than storing attention
rows during decoding (``Hq x 512 x N``).
"""

from __future__ import annotations

import mlx.core as mx

from .features import gqa_mean

#: Query-head x row x key elements computed at once (~256 MB of float32).
_MAX_ELEMENTS = 1 << 26


def attention_probabilities(
    queries: mx.array,
    keys: mx.array,
    scale: float,
    rows: int | None = None,
    dtype: str = "float32",
) -> mx.array:
    """GQA-averaged attention of the newest queries over all cached keys.

    queries: ``[B, Hq, n, D]`` post-RoPE queries of the ``n`` newest tokens,
    which occupy the last ``n`` key slots. keys: ``[B, H, N, D]``. ``rows``
    keeps only the last ``rows`` queries (``None``: all). The softmax is in
    float32; with ``dtype="bfloat16"`` each head's probabilities and the group
    mean are rounded to bf16 as a half-precision reference model would hand
    them over. Returns float32 ``[B, H, rows, N]``.

    KV heads are processed in groups so no more than ``_MAX_ELEMENTS`` logits
    exist at once.
    """
    B, Hq, n, D = queries.shape
    H, N = keys.shape[1], keys.shape[2]
    group = Hq // H
    if rows is not None and rows < n:
        queries, first_row = queries[:, :, n - rows :], n - rows
    else:
        first_row, rows = 0, n
    query_pos = (N - n + first_row) + mx.arange(rows)
    visible = mx.arange(N)[None, :] <= query_pos[:, None]  # [rows, N]
    q = queries.astype(mx.float32).reshape(B, H, group, rows, D) * scale
    k = keys.astype(mx.float32)
    heads_per_chunk = max(1, min(H, _MAX_ELEMENTS // max(1, B * group * rows * N)))
    parts = []
    for start in range(0, H, heads_per_chunk):
        stop = min(H, start + heads_per_chunk)
        logits = q[:, start:stop] @ mx.swapaxes(k[:, start:stop, None], -1, -2)  # [B, h, G, rows, N]
        probs = mx.softmax(mx.where(visible, logits, -mx.inf), axis=-1, precise=True)
        mean = gqa_mean(probs.reshape(B, (stop - start) * group, rows, N), stop - start, dtype)
        if heads_per_chunk < H:
            mx.eval(mean)  # free this chunk's logits before the next one
        parts.append(mean)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
