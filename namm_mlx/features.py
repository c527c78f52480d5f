"""Token features of a NAMM: attention spectrogram, EMA, normalisation, age (spec §2).

Every cached token gets 25 numbers: an 8-d sinusoidal embedding of its age and
the 17 normalised STFT magnitudes of the attention it has received, smoothed by
an exponential moving average carried across calls. All functions work on
arbitrary leading axes (batch, KV heads, or stacked layers) so a whole layer is
one vectorised computation; nothing loops over tokens.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import numpy as np

from .config import NAMMConfig


def gqa_mean(attn: mx.array, num_kv_heads: int, dtype: str = "float32") -> mx.array:
    """Average the query heads that share a KV head.

    attn: ``[..., Hq, n, N]`` probabilities; query head ``h`` belongs to KV
    head ``h // (Hq // num_kv_heads)`` (mlx-lm's and HF's ``repeat_kv`` order).
    With ``dtype="bfloat16"`` each head and the mean are rounded to bf16 as the
    reference's half-precision model hands them over (mean accumulated in fp32).
    Returns ``[..., H, n, N]`` float32.

    The group members are summed as separate slices in one compiled
    elementwise kernel: on the CPU backend that is one pass over the
    probabilities instead of several (casts, a reduction, a division): 32 ms
    instead of 438 ms for 9 x 512 x 4096 bf16-rounded, with identical bits.
    """
    *lead, hq, n, N = attn.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads cannot be grouped into {num_kv_heads} KV heads")
    group = hq // num_kv_heads
    grouped = attn.reshape(*lead, num_kv_heads, group, n, N)
    members = [grouped[..., g, :, :] for g in range(group)]
    return _group_mean(group, dtype == "bfloat16")(*members)


@functools.lru_cache(maxsize=None)
def _group_mean(group: int, round_bf16: bool):
    def mean(*members: mx.array) -> mx.array:
        def cast(x: mx.array) -> mx.array:
            x = x.astype(mx.float32)
            return x.astype(mx.bfloat16).astype(mx.float32) if round_bf16 else x

        total = cast(members[0])
        for m in members[1:]:
            total = total + cast(m)
        out = total / group
        return out.astype(mx.bfloat16).astype(mx.float32) if round_bf16 else out

    return mx.compile(mean)


def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window ``0.5 - 0.5 cos(2 pi m / n_fft)`` (torch's default)."""
    m = np.arange(n_fft, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * m / n_fft)


def _windowed_dft(config: NAMMConfig) -> mx.array:
    """``[n_fft, 2 * n_bins]`` matrix: window times cos | -sin of the one-sided DFT.

    A 32-sample real DFT is cheaper as one small matmul than as an FFT call per
    frame, and the matmul batches over every token of every head at once.
    """
    n_fft, n_bins = config.n_fft, config.n_bins
    m = np.arange(n_fft, dtype=np.float64)[:, None]
    f = np.arange(n_bins, dtype=np.float64)[None, :]
    angle = 2.0 * np.pi * m * f / n_fft
    w = hann_window(n_fft)[:, None]
    return mx.array(np.concatenate([w * np.cos(angle), -w * np.sin(angle)], axis=1).astype(np.float32))


def attention_series(attn: mx.array, prev_tail: mx.array | None, config: NAMMConfig) -> mx.array:
    """Per-token attention time series with its carried left context.

    attn: ``[..., n, N]`` (GQA-averaged rows = new queries, columns = cache slots).
    prev_tail: ``[..., N_old, ctx]`` the last ``ctx = n_fft - hop`` samples each
    old slot received in the previous call, or None for a new sequence. New
    slots (the last ``N - N_old``) get zeros, as in the reference.
    Returns ``[..., N, ctx + n]``.
    """
    series = mx.swapaxes(attn, -1, -2)
    *lead, N, _ = series.shape
    ctx = config.context_len
    n_old = 0 if prev_tail is None else prev_tail.shape[-2]
    parts = []
    if n_old:
        parts.append(prev_tail.astype(mx.float32))
    if N - n_old:
        parts.append(mx.zeros((*lead, N - n_old, ctx), dtype=mx.float32))
    context = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)
    return mx.concatenate([context, series], axis=-1)


def stft_magnitudes(series: mx.array, config: NAMMConfig) -> mx.array:
    """One-sided STFT magnitudes, periodic Hann, no centering (spec §2.2).

    series: ``[..., N, ctx + n]`` with ``n`` a multiple of the hop.
    Returns ``[..., N, F, n_bins]`` with ``F = n / hop`` frames; frame ``t``
    covers samples ``[hop t, hop t + n_fft)``.

    Each frame is two consecutive hop-long blocks, so the DFT of frame ``t`` is
    ``block[t] @ D_first + block[t+1] @ D_second``: every block is multiplied
    once instead of twice, and no overlapping frames are materialised.
    """
    hop = config.hop
    *lead, N, length = series.shape
    if length % hop:
        raise ValueError(f"series length {length} is not a multiple of the hop {hop}")
    frames = length // hop - 1
    # One flat GEMM per half-window instead of many tiny batched ones.
    blocks = series.reshape(-1, hop)
    dft = _windowed_dft(config)
    first = (blocks @ dft[:hop]).reshape(-1, frames + 1, dft.shape[1])
    second = (blocks @ dft[hop:]).reshape(-1, frames + 1, dft.shape[1])
    spectrum = (first[:, :-1] + second[:, 1:]).reshape(*lead, N, frames, dft.shape[1])
    n_bins = config.n_bins
    real, imag = spectrum[..., :n_bins], spectrum[..., n_bins:]
    return mx.sqrt(real * real + imag * imag)


def ema_over_frames(
    magnitudes: mx.array, prev_ema: mx.array | None, config: NAMMConfig
) -> mx.array:
    """Collapse the frames with the carried EMA (spec §2.3).

    magnitudes: ``[..., N, F, n_bins]``; prev_ema: ``[..., N_old, n_bins]`` or None.
    Frame ``t`` weighs ``(1 - b) b^(F-1-t)`` with ``b = ema_coeff ** hop``; a new
    slot ``j`` (0-based among the new ones) only counts frames
    ``t >= j // hop`` (the strided causal mask); old slots add
    ``ema_coeff ** n * prev_ema``. No bias correction.
    Returns ``[..., N, n_bins]``, before normalisation (this is the carried state).
    """
    *lead, N, F, _ = magnitudes.shape
    hop = config.hop
    beta = config.ema_coeff**hop
    frame_weight = (1.0 - beta) * beta ** np.arange(F - 1, -1, -1, dtype=np.float64)
    n_old = 0 if prev_ema is None else prev_ema.shape[-2]
    new_index = np.arange(N) - n_old  # negative for old slots: every frame counts
    first_frame = np.where(new_index >= 0, new_index // hop, 0)
    weights = np.where(np.arange(F)[None, :] >= first_frame[:, None], frame_weight[None, :], 0.0)
    weights = mx.array(weights.astype(np.float32))  # [N, F]
    ema = (magnitudes * weights[:, :, None]).sum(axis=-2)
    if n_old:
        carried = prev_ema.astype(mx.float32) * np.float32(config.ema_coeff ** (F * hop))
        ema = mx.concatenate([ema[..., :n_old, :] + carried, ema[..., n_old:, :]], axis=-2)
    return ema


#: Values of one chunk of STFT frames (16 MB of float32) in :func:`spectral_ema`.
MAX_SPECTRUM = 1 << 22


def spectral_ema(
    attn: mx.array, prev_tail: mx.array | None, prev_ema: mx.array | None, config: NAMMConfig
) -> tuple[mx.array, mx.array, mx.array]:
    """STFT magnitudes, their EMA and the tail to carry, without transposing ``attn``.

    The same numbers as :func:`attention_series` -> :func:`stft_magnitudes` ->
    :func:`ema_over_frames` (up to float summation order), computed in the
    probabilities' own layout: time runs along the query rows, and the rows of
    a row-major ``[n, N]`` array that frame ``t >= 1`` covers
    (``[hop (t-1), hop (t-1) + n_fft)``) are one contiguous run of memory. So
    every frame is a strided *view* of the probabilities, and the windowed DFT
    of all of them is one ``[2 * n_bins, n_fft] @ [n_fft, N]`` product per
    frame with nothing copied. Only frame 0, which starts in the carried
    context, is assembled. On the CPU backend, for 3 heads x 512 queries x
    4096 slots, that product took 18-50 ms against 81-100 ms for two
    half-window products per hop-long block, whose output is twice as large.
    The magnitudes are weighted by the EMA's frame weights in one compiled
    elementwise kernel before the frame sum.

    attn: ``[..., n, N]``; prev_tail ``[..., N_old, ctx]`` and prev_ema
    ``[..., N_old, n_bins]`` or None. Returns ``(stft, ema, tail)``: stft
    ``[..., N, F, n_bins]`` (lazy: only computed if evaluated), ema
    ``[..., N, n_bins]`` (the carried state, before normalisation) and tail
    ``[..., N, ctx]`` (the last ``ctx`` samples of each slot's series).
    """
    hop, n_bins, n_fft = config.hop, config.n_bins, config.n_fft
    *lead, n, N = attn.shape
    if n % hop:
        raise ValueError(f"a NAMM call needs a multiple of {hop} new queries, got {n}")
    frames = n // hop
    n_old = 0 if prev_tail is None else prev_tail.shape[-2]
    attn = attn.astype(mx.float32)
    flat = attn.reshape(-1, n, N)  # the leading axes as one
    dft = _windowed_dft(config).T  # [2 * n_bins, n_fft]: cos rows, then -sin rows

    def frame_views(f0: int, f1: int) -> mx.array:
        """Frames ``[f0, f1)`` (``f0 >= 1``) as ``[L, f1 - f0, n_fft, N]``; a
        view when ``flat`` is row-contiguous (``as_strided`` copies otherwise)."""
        return mx.as_strided(flat, (flat.shape[0], f1 - f0, n_fft, N), (n * N, hop * N, N, 1), hop * N * (f0 - 1))

    # Frame 0: the carried context (zeros for new slots), then the first hop of rows.
    context = mx.zeros((flat.shape[0], hop, N - n_old), dtype=mx.float32)
    if n_old:
        carried_tail = mx.swapaxes(prev_tail.astype(mx.float32), -1, -2).reshape(-1, hop, n_old)
        context = mx.concatenate([carried_tail, context], axis=-1)
    first = dft @ mx.concatenate([context, flat[:, :hop]], axis=1)  # [L, 2 * n_bins, N]
    weights = mx.array(_frame_weights(config, frames, N, n_old))  # [frames, N]
    weighted = _weighted_magnitudes(n_bins)
    ema = weighted(first, weights[0])  # [L, n_bins, N]
    # One chunk's spectrum stays under MAX_SPECTRUM values, so the transient
    # does not grow with the cache.
    per_chunk = max(1, MAX_SPECTRUM // max(1, flat.shape[0] * 2 * n_bins * N))
    for f0 in range(1, frames, per_chunk):
        f1 = min(frames, f0 + per_chunk)
        ema = ema + weighted(dft @ frame_views(f0, f1), weights[f0:f1, None, :]).sum(axis=1)
        if f1 < frames:
            mx.eval(ema)
    ema = mx.swapaxes(ema, -1, -2).reshape(*lead, N, n_bins)
    if n_old:
        carried = prev_ema.astype(mx.float32) * np.float32(config.ema_coeff ** (frames * hop))
        ema = mx.concatenate([ema[..., :n_old, :] + carried, ema[..., n_old:, :]], axis=-2)
    # Lazy: the magnitudes of every frame are only computed if evaluated.
    spectrum = first[:, None] if frames == 1 else mx.concatenate([first[:, None], dft @ frame_views(1, frames)], axis=1)
    real, imag = spectrum[:, :, :n_bins], spectrum[:, :, n_bins:]
    stft = mx.transpose(mx.sqrt(real * real + imag * imag), (0, 3, 1, 2)).reshape(*lead, N, frames, n_bins)
    # A copy, not a view: the tail is carried to the next step, and a view
    # would keep this step's whole [..., n, N] probabilities alive with it.
    tail = mx.contiguous(mx.swapaxes(attn[..., n - config.context_len :, :], -1, -2))
    return stft, ema, tail


def _frame_weights(config: NAMMConfig, frames: int, N: int, n_old: int) -> np.ndarray:
    """``[frames, N]`` EMA weight of each frame for each slot (spec §2.3): frame
    ``t`` weighs ``(1 - b) b^(F-1-t)``, ``b = ema_coeff ** hop``; the ``j``-th
    new slot only counts frames ``t >= j // hop``."""
    beta = config.ema_coeff**config.hop
    frame_weight = (1.0 - beta) * beta ** np.arange(frames - 1, -1, -1, dtype=np.float64)
    new_index = np.arange(N) - n_old
    first_frame = np.where(new_index >= 0, new_index // config.hop, 0)
    return np.where(np.arange(frames)[:, None] >= first_frame[None, :], frame_weight[:, None], 0.0).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _weighted_magnitudes(n_bins: int):
    """Compiled ``|spectrum| * weight`` for ``[..., 2 * n_bins, N]`` spectra
    (real rows, then imaginary): one pass instead of four."""

    def weighted(spectrum: mx.array, weight: mx.array) -> mx.array:
        real, imag = spectrum[..., :n_bins, :], spectrum[..., n_bins:, :]
        return mx.sqrt(real * real + imag * imag) * weight

    return mx.compile(weighted)


def normalize_spectrum(ema: mx.array, norm_mean: mx.array, norm_var: mx.array, eps: float) -> mx.array:
    """Z-score with the frozen global statistics: ``(E - mean) / max(sqrt(var), eps)``."""
    std = mx.maximum(mx.sqrt(norm_var.astype(mx.float32)), eps)
    return (ema - norm_mean.astype(mx.float32)) / std


def key_norm_feature(keys: mx.array) -> mx.array:
    """``-log ||k||`` per slot, z-scored over each head's slots: ``[..., N, 1]``.

    Key norms differ by layer and head by an order of magnitude, and only the
    order within a head matters to which tokens a head keeps, so each head is
    standardised on its own tokens instead of with frozen global statistics.
    keys: ``[..., N, D]``.
    """
    k = keys.astype(mx.float32)
    x = -0.5 * mx.log((k * k).sum(axis=-1) + 1e-12)
    mean = x.mean(axis=-1, keepdims=True)
    std = mx.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True))
    return ((x - mean) / mx.maximum(std, 1e-6))[..., None]


class RecencyTable:
    """Sinusoidal age embedding, looked up by integer age (spec §2.5).

    The reference tabulates ``[sin(a w_j), cos(a w_j)]``, ``w_j = max_freq^(-j/(d/2))``,
    in float64 and stores float32. Computing ``sin`` of a large float32 argument
    would be off by ~1e-4 at age 30k, so we tabulate the same way and grow the
    table on demand, which also serves ages past the reference's 32k limit.
    """

    def __init__(self, config: NAMMConfig, initial_size: int = 4096) -> None:
        self.config = config
        self._table = self._build(initial_size)

    def _build(self, size: int) -> mx.array:
        half = self.config.recency_dim // 2
        freqs = self.config.recency_max_freq ** (-np.arange(half, dtype=np.float64) / half)
        angles = np.arange(size, dtype=np.float64)[:, None] * freqs[None, :]
        return mx.array(np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32))

    def __call__(self, age: mx.array, max_age: int | None = None) -> mx.array:
        """age: integer ``[...]`` (non-negative). Returns ``[..., recency_dim]``.

        ``max_age`` (an upper bound known to the caller) avoids a host sync.
        """
        if max_age is None:
            max_age = int(age.max().item()) if age.size else 0
        if max_age >= self._table.shape[0]:
            self._table = self._build(1 << math.ceil(math.log2(max_age + 1)))
        return self._table[age]


def token_ages(positions: mx.array, start: int = 0) -> mx.array:
    """Age of every slot: newest slot's position minus the slot's position.

    positions: ``[..., N]`` absolute positions in cache order (newest last).
    """
    return positions[..., -1:] - positions + start
