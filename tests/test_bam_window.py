"""The BAM's attention window: the banded kernel against a dense mask, and a
windowed NAMM that loads, scores and distils like the reference one."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from namm_mlx import NAMMConfig
from namm_mlx import bam as bam_module
from namm_mlx.bam import backward_attention


def dense_backward(q, k, v, window):
    """Softmax attention with the mask spelled out: query i sees keys i..i+window-1."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    n = q.shape[-2]
    logits = q @ np.swapaxes(k, -1, -2) * q.shape[-1] ** -0.5
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (j >= i) & ((j < i + window) if window else True)
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("window", [0, 1, 5, 16, 37, 300])
@pytest.mark.parametrize("max_logits", [1 << 22, 600])
def test_windowed_backward_attention_equals_the_dense_mask(window, max_logits, monkeypatch):
    # 600 logits per chunk forces many small chunks, so the band crosses chunk edges
    monkeypatch.setattr(bam_module, "_MAX_LOGITS_PER_CHUNK", max_logits)
    monkeypatch.setattr(bam_module, "_MIN_CHUNK", 4)
    rng = np.random.default_rng(window)
    q, k, v = (rng.normal(size=(2, 1, 83, 8)).astype(np.float32) for _ in range(3))
    got = np.array(backward_attention(mx.array(q), mx.array(k), mx.array(v), window))
    np.testing.assert_allclose(got, dense_backward(q, k, v, window), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("window", [16, 37])
def test_base2_softmax_survives_a_huge_logit_behind_the_mask(window):
    """Key 40 gets a logit of ~700 from every query, but only the queries within
    the window before it may see it. Each row's powers must be taken from its own
    visible peak: a peak over the block's masked keys too underflows the rows
    that cannot see key 40, and one that skipped the mask would overflow."""
    rng = np.random.default_rng(window)
    u = rng.normal(size=8).astype(np.float32)
    u /= np.linalg.norm(u)
    q = np.tile(u * 20.0, (1, 1, 83, 1)).astype(np.float32)
    k = rng.normal(size=(1, 1, 83, 8)).astype(np.float32) * 0.1
    k[0, 0, 40] = u * 100.0
    v = rng.normal(size=(1, 1, 83, 8)).astype(np.float32)
    got = np.array(backward_attention(mx.array(q), mx.array(k), mx.array(v), window))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, dense_backward(q, k, v, window), rtol=2e-5, atol=2e-6)


def test_the_window_changes_scores_only_when_it_is_shorter_than_the_cache():
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(size=(1, 1, 64, 8)).astype(np.float32)) for _ in range(3))
    full = np.array(backward_attention(q, k, v))
    assert np.array_equal(np.array(backward_attention(q, k, v, 64)), full)
    assert np.array_equal(np.array(backward_attention(q, k, v, 1000)), full)
    assert not np.allclose(np.array(backward_attention(q, k, v, 8)), full)


def test_bam_window_is_a_recorded_setting():
    config = NAMMConfig(bam_window=256)
    assert NAMMConfig.from_dict(config.to_dict()).bam_window == 256
    assert config.param_size == NAMMConfig().param_size  # no new weights
    with pytest.raises(ValueError, match="bam_window"):
        NAMMConfig(bam_window=-1)


def _namm(window: int):
    from namm_mlx import NAMM

    config = NAMMConfig(update_interval=32, bam_window=window)
    flat = np.random.default_rng(0).normal(0.0, 0.3, config.param_size).astype(np.float32)
    return NAMM.from_flat(flat, np.zeros(17, np.float32), np.ones(17, np.float32), config)


def test_a_windowed_namm_evicts_survives_the_prompt_cache_and_is_not_exported(tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
    from tiny_models import VOCAB, tiny_model

    import namm_mlx
    from namm_mlx import NAMM
    from namm_mlx.convert import ConversionError, export_checkpoint

    model = tiny_model("llama", seed=3)
    prompt = mx.array([np.random.default_rng(2).integers(0, VOCAB, 96).tolist()])
    kept = {}
    for window in (0, 8):
        folder = _namm(window).save(tmp_path / f"w{window}")
        namm_mlx.attach(model, NAMM.load(folder), max_kv_size=40)
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        mx.eval([c.state for c in cache])
        assert all(c.steps >= 1 and c.length <= 40 for c in cache), [(c.steps, c.length) for c in cache]
        kept[window] = [np.array(c.kept_positions[0]) for c in cache]
        namm_mlx.detach(model)
    # the same weights keep other tokens once each token sees only 8 newer ones
    assert any(not np.array_equal(a, b) for a, b in zip(kept[0], kept[8]))
    save_prompt_cache(str(tmp_path / "p.safetensors"), cache, {})
    assert load_prompt_cache(str(tmp_path / "p.safetensors"))[0].scorer.namm.config.bam_window == 8
    with pytest.raises(ConversionError, match="bam_window"):
        export_checkpoint(tmp_path / "w8", tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()
