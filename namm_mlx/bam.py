"""The backward-attention memory (BAM) scorer (spec §3).

A single tiny attention layer over one head's cached tokens in which each token
attends only to itself and *newer* tokens, followed by a FiLM-style gate on the
token features and a linear read-out to one score per token. It has no
learned state beyond its 4,172 weights and is shared by every layer and head.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .config import NAMMConfig

#: Query rows per chunk are chosen so one chunk's attention logits stay below
#: this many float32 values (16 MB) and are evaluated one at a time. Measured
#: on the CPU backend for 3 heads x 4k tokens: 2.30 s and a 28 MB peak, against
#: 2.67 s and 147 MB with 16x larger chunks evaluated together; the cost is
#: the softmax's exponentials, not the number of calls.
_MAX_LOGITS_PER_CHUNK = 1 << 22
#: Below this many rows per chunk, per-call overhead outweighs the skipped work.
_MIN_CHUNK = 128
#: Logits times this give the same softmax through ``2 ** x`` (:func:`_masked_exp2`).
_LOG2E = 1.4426950408889634


@dataclass
class BAMWeights:
    """The evolved tensors, input-major ``[in, out]`` as in the reference."""

    qkv_weight: mx.array  # [E, 3 * hidden], columns q | k | v
    qkv_bias: mx.array  # [3 * hidden]
    out_weight: mx.array  # [hidden, 2 * E], columns additive | multiplicative
    out_bias: mx.array  # [2 * E]
    readout_weight: mx.array  # [E, 1]
    readout_bias: mx.array  # [1]

    def as_list(self) -> list[mx.array]:
        return [
            self.qkv_weight,
            self.qkv_bias,
            self.out_weight,
            self.out_bias,
            self.readout_weight,
            self.readout_bias,
        ]


@dataclass
class BAMOutput:
    """Scores and the intermediates the reference fixtures record."""

    scores: mx.array  # [..., N]
    attention_output: mx.array  # [..., N, 2E] after the output projection
    gated_features: mx.array  # [..., N, E] x * (1 + m) + r, the read-out input


def backward_attention(q: mx.array, k: mx.array, v: mx.array, window: int = 0) -> mx.array:
    """Softmax attention where query ``i`` sees keys ``j >= i`` only (and, with
    ``window`` > 0, only ``j < i + window``).

    q, k, v: ``[B, heads, N, d]``. Reversing the token axis turns the backward
    mask into an ordinary causal one, so the fused kernel's ``"causal"`` mode
    applies and no ``N x N`` mask is ever built. Rows are processed in chunks
    so the logits never exceed ``_MAX_LOGITS_PER_CHUNK`` values; a chunk of
    reversed rows ``[r0, r1)`` only needs keys ``[0, r1)`` (the lower-right
    aligned causal mask is then exactly right), which skips the masked half.
    A window goes to :func:`_banded_causal` instead, whose cost grows as
    ``N x window`` rather than ``N^2 / 2``.
    """
    B, heads, N, d = q.shape
    q, k, v = q[:, :, ::-1], k[:, :, ::-1], v[:, :, ::-1]
    if 0 < window < N:
        return _banded_causal(q, k, v, window)[:, :, ::-1]
    scale = d**-0.5
    # Several chunks also skip the masked triangle: ~(1/2 + 1/16) of N^2.
    chunk = max(1, min(N, _MAX_LOGITS_PER_CHUNK // max(1, B * heads * N), max(_MIN_CHUNK, -(-N // 8))))
    outputs = []
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        out = mx.fast.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], scale=scale, mask="causal"
        )
        if chunk < N:
            mx.eval(out)  # one chunk's logits at a time (lazily, all would coexist)
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
    return out[:, :, ::-1]


def _banded_causal(q: mx.array, k: mx.array, v: mx.array, window: int) -> mx.array:
    """Causal attention in which row ``i`` sees keys ``(i - window, i]``.

    Rows are cut into blocks of ``b`` (about a quarter of the window); a block
    reads its own keys and the ``m = ceil((window - 1) / b)`` blocks before
    it, so every row computes ``window + b`` logits at most instead of the
    ``2 x window`` a chunk as tall as the window needs, and all blocks go
    through one batched matmul instead of one call per chunk. The softmax's
    exponentials are most of the cost on the CPU, hence :func:`_masked_exp2`
    (one layer at 4k, window 128: 28 ms instead of 63 ms with ``mx.softmax``).
    Groups of blocks are evaluated one at a time so the logits stay under
    ``_MAX_LOGITS_PER_CHUNK`` values.
    """
    B, heads, N, d = q.shape
    scale = d**-0.5
    b = max(16, min(128, window // 4))
    m = -(-(window - 1) // b)
    nb = -(-N // b)

    def blocks(x: mx.array, front: int) -> mx.array:
        x = mx.pad(x, [(0, 0), (0, 0), (front, nb * b - N), (0, 0)])
        return x.reshape(B, heads, -1, b, d)

    qb = blocks(q, 0) * (scale * _LOG2E)  # [B, heads, nb, b, d]; logits in base 2
    kb, vb = blocks(k, m * b), blocks(v, m * b)  # [B, heads, m + nb, b, d]; m blocks of padding first
    rows = mx.arange(nb * b).reshape(nb, b, 1)
    cols = (mx.arange(nb)[:, None] * b + mx.arange(-m * b, b)[None, :])[:, None, :]
    visible = (cols <= rows) & (cols > rows - window) & (cols >= 0)  # [nb, b, (m + 1) b]
    group = max(1, _MAX_LOGITS_PER_CHUNK // max(1, B * heads * b * (m + 1) * b))
    outputs = []
    for g0 in range(0, nb, group):
        g1 = min(nb, g0 + group)
        # Block i's keys: blocks i .. i + m of the padded sequence, side by side.
        keys = mx.concatenate([kb[:, :, g0 + j : g1 + j] for j in range(m + 1)], axis=3)
        values = mx.concatenate([vb[:, :, g0 + j : g1 + j] for j in range(m + 1)], axis=3)
        logits = qb[:, :, g0:g1] @ mx.swapaxes(keys, -1, -2)
        peak = mx.stop_gradient(mx.where(visible[g0:g1], logits, -mx.inf).max(axis=-1, keepdims=True))
        weights = _masked_exp2(logits, visible[g0:g1], peak)
        # Normalising after the product divides d values per row instead of window + b.
        out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
        if group < nb:
            mx.eval(out)
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
    return out.reshape(B, heads, nb * b, d)[:, :, :N]


@mx.compile
def _masked_exp2(logits: mx.array, visible: mx.array, peak: mx.array) -> mx.array:
    """``2 ** (logits - peak)`` where ``visible``, else 0: softmax numerators.

    Base 2 because mlx's CPU backend takes about 18 ns per ``exp`` (its
    ``softmax`` too) and 8 ns per ``power(2, x)`` (2-core x86, mlx 0.32; not
    measured on Metal, where the same code is correct); the subtraction and
    the mask run in the same compiled pass. ``peak`` must be each row's
    largest visible logit (never smaller, or the powers overflow; never much
    larger, or they underflow to 0).
    """
    return mx.where(visible, mx.power(2.0, logits - peak), 0.0)


def bam_scores(features: mx.array, weights: BAMWeights, config: NAMMConfig) -> BAMOutput:
    """Score every token of every head.

    features: ``[..., N, E]`` (E = 25: recency then normalised spectrum), one
    independent sequence per leading index (batch, head, or layer x head).
    """
    *lead, N, E = features.shape
    x = features.astype(mx.float32).reshape(-1, N, E)
    hidden, heads = config.hidden_dim, config.num_heads
    qkv = x @ weights.qkv_weight + weights.qkv_bias

    def split_heads(t: mx.array) -> mx.array:
        return t.reshape(-1, N, heads, hidden // heads).transpose(0, 2, 1, 3)

    q, k, v = (split_heads(qkv[..., i * hidden : (i + 1) * hidden]) for i in range(3))
    attended = backward_attention(q, k, v, config.bam_window).transpose(0, 2, 1, 3).reshape(-1, N, hidden)
    out = attended @ weights.out_weight + weights.out_bias
    additive, multiplicative = out[..., :E], out[..., E:]
    gated = x * (1.0 + multiplicative) + additive
    scores = (gated @ weights.readout_weight + weights.readout_bias)[..., 0]
    return BAMOutput(
        scores=scores.reshape(*lead, N),
        attention_output=out.reshape(*lead, N, 2 * E),
        gated_features=gated.reshape(*lead, N, E),
    )
