"""The eviction step takes its attention from the forward, and quantised kept tokens.

* A block-aligned forward computes its attention explicitly: its output equals
  the fused kernel's and the probabilities it hands the scorer equal the ones
  recomputed from buffered queries (so a NAMM decides exactly as before).
* ``kv_bits`` stores the kept keys/values quantised: fewer bytes, nearly the
  same outputs, eviction still works, and prompt caches round-trip.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache
from tiny_models import VOCAB, tiny_model

import namm_mlx
from namm_mlx import NAMM, EvictingKVCache, NAMMConfig
from namm_mlx.attention import attention_probabilities, attention_with_probabilities
from namm_mlx.policies import NAMMScorer

INTERVAL = 32
CONFIG = NAMMConfig(update_interval=INTERVAL)


@pytest.fixture(scope="module")
def fixture_namm(reference_conversion) -> NAMM:
    e = reference_conversion
    return NAMM.from_flat(e["param_vector"], e["norm.mean"], e["norm.var"], CONFIG)


def tokens(n: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, n)]


@pytest.mark.parametrize("max_logits", [1 << 23, 700])  # one chunk, many row chunks
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_explicit_attention_equals_fused_and_recomputed(max_logits, dtype):
    mx.random.seed(3)
    q = mx.random.normal((1, 6, 40, 16)) * 2
    k = mx.random.normal((1, 2, 100, 16)) * 2
    v = mx.random.normal((1, 2, 100, 16))
    out, probs = attention_with_probabilities(q, k, v, 0.25, dtype, max_logits=max_logits)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    np.testing.assert_allclose(np.asarray(out), np.asarray(fused), atol=1e-5, rtol=1e-5)
    recomputed = attention_probabilities(q, k, 0.25, dtype=dtype, max_logits=max_logits)
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(recomputed))
    assert probs.shape == (1, 2, 40, 100)
    # Causal: query r (slot 60 + r) gives nothing to later slots.
    assert float(probs[0, :, 0, 61:].max()) == 0.0 and float(probs[0, :, 0, 60].min()) > 0.0


class RecordingScorer(NAMMScorer):
    """The NAMM scorer, also recording the probabilities it used and whether
    the cache took them from the forward."""

    def __init__(self, namm: NAMM) -> None:
        super().__init__(namm)
        self.seen: list[tuple[bool, np.ndarray, bool]] = []

    def score(self, context):
        used = np.asarray(context.attention(dtype=self.attention_dtype))
        self.seen.append((context.probabilities is not None, used, context.queries is not None))
        return super().score(context)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probabilities_from_the_forward_equal_recomputed(fixture_namm, dtype):
    model = tiny_model("llama")
    namm = NAMM.from_flat(fixture_namm.to_flat(), fixture_namm.norm_mean, fixture_namm.norm_var,
                          NAMMConfig(update_interval=INTERVAL, attention_dtype=dtype))  # fmt: skip
    scorer = RecordingScorer(namm)
    namm_mlx.attach(model, scorer, max_kv_size=48)
    prompt = tokens(160)

    def run(chunk: int) -> list:
        cache = model.make_cache()
        for start in range(0, len(prompt), chunk):
            model(mx.array([prompt[start : start + chunk]]), cache=cache)
        return cache

    aligned = run(INTERVAL)  # block-aligned: probabilities from the forward, no query buffer
    taken = list(scorer.seen)
    scorer.seen.clear()
    halves = run(INTERVAL // 2)  # the block in two forwards: recomputed from buffered queries
    recomputed = list(scorer.seen)
    assert len(taken) == len(recomputed) == 5 * len(model.layers)
    assert all(was_taken and not buffered for was_taken, _, buffered in taken)
    assert not any(was_taken for was_taken, _, _ in recomputed)
    # The two runs' keys differ in the last float bits (other forward sizes),
    # which can move a bf16 rounding by one step.
    rtol = 1e-4 if dtype == "float32" else 2**-7
    for (_, a, _), (_, b, _) in zip(taken, recomputed):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7)
    # Same probabilities, same decisions, same model outputs afterwards.
    for a, b in zip(aligned, halves):
        assert a.steps == b.steps == 5 and a.queries is None
        np.testing.assert_array_equal(np.asarray(a.kept_positions), np.asarray(b.kept_positions))
    follow = mx.array([tokens(1, seed=9)])
    np.testing.assert_allclose(
        np.asarray(model(follow, cache=aligned)), np.asarray(model(follow, cache=halves)), atol=1e-4, rtol=1e-4
    )


def test_decoding_steps_still_recompute(fixture_namm):
    model = tiny_model("qwen3")
    scorer = RecordingScorer(fixture_namm)
    namm_mlx.attach(model, scorer)
    cache = model.make_cache()
    for t in tokens(INTERVAL):
        model(mx.array([[t]]), cache=cache)
    assert scorer.seen and all(not was_taken and buffered for was_taken, _, buffered in scorer.seen)


def test_kv_bits_store_quantised_tokens(fixture_namm, tmp_path):
    model = tiny_model("llama", head_dim=64, hidden_size=128)
    prompt = tokens(100)
    namm_mlx.attach(model, fixture_namm, max_kv_size=48)
    plain = make_prompt_cache(model)
    namm_mlx.attach(model, fixture_namm, max_kv_size=48, kv_bits=8)
    quant = make_prompt_cache(model)
    assert all(isinstance(c, EvictingKVCache) and c.kv_bits == 8 for c in quant)
    for start in range(0, len(prompt), INTERVAL):
        chunk = mx.array([prompt[start : start + INTERVAL]])
        out_plain, out_quant = model(chunk, cache=plain), model(chunk, cache=quant)
        if start == 0:  # before any eviction: the same numbers as mlx-lm's own quantised cache
            stock = model(chunk, cache=[QuantizedKVCache(64, 8) for _ in model.layers])
            # (up to summation order, which this peaky random model amplifies)
            to_stock = float(mx.abs(out_quant - stock).max())
            to_plain = float(mx.abs(out_quant - out_plain).max())
            assert to_stock < 0.2 * to_plain and to_stock < 1e-2 * float(mx.abs(stock).max())
    c = quant[0]
    assert isinstance(c.keys, tuple) and c.steps == 3 and c.length <= 48 + INTERVAL
    assert c.kv_nbytes < 0.35 * plain[0].kv_nbytes  # 8 bits + a scale and bias per 64 values, vs float32

    path = str(tmp_path / "q.safetensors")
    save_prompt_cache(path, quant)
    loaded = load_prompt_cache(path)
    assert loaded[0].kv_bits == 8 and isinstance(loaded[0].keys, tuple)
    follow = mx.array([tokens(20, seed=5)])
    np.testing.assert_array_equal(np.asarray(model(follow, cache=loaded)), np.asarray(model(follow, cache=quant)))


def test_mlx_lm_kv_bits_quantises_a_namm_cache(fixture_namm):
    model = tiny_model("qwen2", hidden_size=256)
    namm_mlx.attach(model, fixture_namm)
    cache = make_prompt_cache(model)
    out = list(generate_step(mx.array(tokens(70)), model, prompt_cache=cache, max_tokens=20,
                             kv_bits=4, quantized_kv_start=0, prefill_step_size=INTERVAL))  # fmt: skip
    assert len(out) == 20
    assert all(isinstance(c, EvictingKVCache) and c.kv_bits == 4 and isinstance(c.keys, tuple) for c in cache)
    assert all(c.steps >= 2 for c in cache)


def test_bad_kv_bits_are_refused(fixture_namm):
    with pytest.raises(ValueError, match="4 or 8"):
        EvictingKVCache(NAMMScorer(fixture_namm), kv_bits=3)


@pytest.mark.parametrize("frames_per_chunk", [None, 1, 2])  # one chunk of frames, or many
@pytest.mark.parametrize("n_old", [0, 48])
def test_spectral_ema_equals_the_literal_pipeline(n_old, frames_per_chunk, monkeypatch):
    """The fast layout (frames as strided views of the probabilities) gives the
    spec's STFT, EMA and tail, however the frames are chunked."""
    from namm_mlx import features
    from namm_mlx.features import attention_series, ema_over_frames, spectral_ema, stft_magnitudes

    mx.random.seed(4)
    n, N = 64, 64 + n_old
    if frames_per_chunk:  # lead x frames x both halves of 17 bins x slots
        monkeypatch.setattr(features, "MAX_SPECTRUM", 2 * 3 * frames_per_chunk * 34 * N)
    attn = mx.softmax(mx.random.normal((2, 3, n, N)) * 3, axis=-1)  # two stacked layers
    tail = mx.random.uniform(shape=(2, 3, n_old, 16)) * 0.01 if n_old else None
    ema = mx.random.uniform(shape=(2, 3, n_old, 17)) * 0.05 if n_old else None
    series = attention_series(attn, tail, CONFIG)
    stft = stft_magnitudes(series, CONFIG)
    expected = (stft, ema_over_frames(stft, ema, CONFIG), series[..., -16:])
    for got, want in zip(spectral_ema(attn, tail, ema, CONFIG), expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_spectral_ema_reads_a_non_contiguous_view_as_its_copy():
    """The frames are strided views of row-major probabilities; a transposed
    view must be laid out first, not read with the wrong strides."""
    from namm_mlx.features import spectral_ema

    x = mx.random.uniform(shape=(2, 3, 96, 64))
    view = mx.swapaxes(x, -1, -2)  # [2, 3, 64, 96], columns contiguous
    for got, want in zip(spectral_ema(view, None, None, CONFIG), spectral_ema(mx.contiguous(view), None, None, CONFIG)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_carried_tail_does_not_hold_the_steps_probabilities():
    """The tail a step carries (16 samples per token) owns its memory: a view
    would keep the whole ``[heads, 512, N]`` probabilities alive until the
    layer's next step, in every layer whose step evicted nothing."""
    from namm_mlx.features import spectral_ema

    attn = mx.softmax(mx.random.normal((1, 3, 512, 2048)), axis=-1)  # 12.6 MB
    mx.eval(attn)
    freed = attn.nbytes
    mx.clear_cache()
    before = mx.get_active_memory()
    tail = spectral_ema(attn, None, None, CONFIG)[2]
    mx.eval(tail)
    del attn
    mx.clear_cache()
    held = mx.get_active_memory() - before + freed
    assert tail.shape == (1, 3, 2048, 16)
    assert held < 4 * tail.nbytes, f"the tail holds {held / 1e6:.1f} MB for its {tail.nbytes / 1e6:.1f} MB"


def test_h2o_uses_the_forwards_probabilities_too():
    """A baseline reading every new query (H2O) gets the forward's probabilities
    and keeps the same tokens as when they are recomputed."""
    from namm_mlx.policies import H2OScorer

    model = tiny_model("qwen2")
    namm_mlx.attach(model, H2OScorer(recent_window=4, interval=INTERVAL), max_kv_size=40)
    prompt = tokens(128)
    kept = []
    for chunk in (INTERVAL, INTERVAL // 2):
        cache = model.make_cache()
        for start in range(0, len(prompt), chunk):
            model(mx.array([prompt[start : start + chunk]]), cache=cache)
        kept.append([np.asarray(c.kept_positions) for c in cache])
        assert all(c.steps == 4 and c.length == 40 for c in cache)
    for a, b in zip(*kept):
        np.testing.assert_array_equal(a, b)
