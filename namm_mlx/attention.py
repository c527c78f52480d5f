"""Attention probabilities for a memory step: taken from the forward, or recomputed.

mlx's fused attention returns only its output. When a step is due right after
a forward whose queries are the whole new block (512-aligned prefill, the
common case), :func:`attention_with_probabilities` computes that forward's
attention explicitly (``softmax(Q K^T * scale)`` in float32, then ``P V``)
and hands the GQA-averaged probabilities to the scorer, so nothing is computed
twice. Otherwise (decoding: one query per forward) the step recomputes them
from buffered queries with :func:`attention_probabilities`; storing queries
(``Hq x 512 x D`` per layer) is far cheaper than storing attention rows.

Both chunk the query rows so no more than ``MAX_LOGITS`` logits exist at once
(the fused kernel on a CPU materialises all of them).

The softmax is mlx's, not the cheaper base-2 one of the BAM (:mod:`.bam`):
with it, the explicit attention equals the fused kernel's bit for bit on the
CPU while its rows fit in one chunk (for SmolLM2's 9 query heads and 512 rows,
up to 1,820 keys), so a NAMM cache that keeps every token computes the full
cache's numbers exactly and features recorded from a full-cache run equal the
online ones. Chunked rows differ from the fused kernel by about 1e-7 (measured
at 1,900-4,096 keys); base 2 differs by about 1e-6.
"""

from __future__ import annotations

import mlx.core as mx

from .features import gqa_mean

#: Query-head x row x key logits computed at once (32 MB of float32). Measured
#: on the CPU backend for SmolLM2's 9/3 heads, 512 queries x 4k keys: 2^21
#: took 1.20x the fused kernel's time, 2^23 1.00x, 2^25 1.03x, with transient
#: peaks of 53, 59 and 105 MB against the fused kernel's 80 MB.
MAX_LOGITS = 1 << 23


def _row_chunk(heads: int, rows: int, keys: int, max_logits: int) -> int:
    return max(1, min(rows, max_logits // max(1, heads * keys)))


def _causal_probs(q: mx.array, k: mx.array, first_pos: int) -> mx.array:
    """Float32 softmax of ``q k^T`` with keys past each row's position hidden.

    q: ``[B, H, G, rows, D]`` already scaled, float32; k: ``[B, H, N, D]``
    float32; row ``r`` sits at absolute slot ``first_pos + r``.
    """
    rows, N = q.shape[-2], k.shape[-2]
    logits = q @ mx.swapaxes(k[:, :, None], -1, -2)  # [B, H, G, rows, N]
    if first_pos < N - 1:  # only a lone newest row sees every key
        visible = mx.arange(N)[None, :] <= (first_pos + mx.arange(rows))[:, None]
        logits = mx.where(visible, logits, -mx.inf)
    return mx.softmax(logits, axis=-1, precise=True)


def attention_probabilities(
    queries: mx.array,
    keys: mx.array,
    scale: float,
    rows: int | None = None,
    dtype: str = "float32",
    max_logits: int = MAX_LOGITS,
) -> mx.array:
    """GQA-averaged attention of the newest queries over all cached keys.

    queries: ``[B, Hq, n, D]`` post-RoPE queries of the ``n`` newest tokens,
    which occupy the last ``n`` key slots. keys: ``[B, H, N, D]``. ``rows``
    keeps only the last ``rows`` queries (``None``: all). The softmax is in
    float32; with ``dtype="bfloat16"`` each head's probabilities and the group
    mean are rounded to bf16 as a half-precision reference model would hand
    them over. Returns float32 ``[B, H, rows, N]``.
    """
    B, Hq, n, D = queries.shape
    H, N = keys.shape[1], keys.shape[2]
    group = Hq // H
    if rows is not None and rows < n:
        queries, first_row = queries[:, :, n - rows :], n - rows
    else:
        first_row, rows = 0, n
    q = queries.astype(mx.float32).reshape(B, H, group, rows, D) * scale
    k = keys.astype(mx.float32)
    chunk = _row_chunk(Hq, rows, N, max_logits)
    parts = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        probs = _causal_probs(q[..., start:stop, :], k, N - n + first_row + start)
        mean = gqa_mean(probs.reshape(B, Hq, stop - start, N), H, dtype)
        if chunk < rows:
            mx.eval(mean)  # free this chunk's logits before the next one
        parts.append(mean)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def attention_with_probabilities(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    dtype: str = "float32",
    max_logits: int = MAX_LOGITS,
) -> tuple[mx.array, mx.array]:
    """One causal attention call that also returns its GQA-averaged probabilities.

    queries: ``[B, Hq, L, D]`` (the last ``L`` slots); keys, values:
    ``[B, H, N, D]``. Returns the attention output ``[B, Hq, L, D]`` in the
    queries' dtype (what the fused kernel with ``mask="causal"`` returns, up
    to float rounding) and float32 ``[B, H, L, N]`` probabilities equal to
    :func:`attention_probabilities` on the same queries (``dtype`` rounds
    them the same way).
    """
    B, Hq, L, D = queries.shape
    H, N = keys.shape[1], keys.shape[2]
    group = Hq // H
    q = queries.astype(mx.float32).reshape(B, H, group, L, D) * scale
    k = keys.astype(mx.float32)
    v = values.astype(mx.float32)[:, :, None]
    chunk = _row_chunk(Hq, L, N, max_logits)
    outputs, means = [], []
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        probs = _causal_probs(q[..., start:stop, :], k, N - L + start)
        out = (probs @ v).reshape(B, Hq, stop - start, v.shape[-1]).astype(queries.dtype)
        mean = gqa_mean(probs.reshape(B, Hq, stop - start, N), H, dtype)
        if chunk < L:
            mx.eval(out, mean)  # free this chunk's logits before the next one
        outputs.append(out)
        means.append(mean)
    if len(outputs) == 1:
        return outputs[0], means[0]
    return mx.concatenate(outputs, axis=2), mx.concatenate(means, axis=2)
