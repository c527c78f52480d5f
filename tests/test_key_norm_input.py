"""The optional key-norm input: a NAMM config that reads each token's key norm.

Off by default (the reference has no such input), so the fixture tests are
untouched; on, it adds one feature after the spectrum, changes which tokens a
NAMM keeps, survives save/load and mlx-lm's prompt cache, and is refused where
the reference format cannot hold it.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from tiny_models import VOCAB, tiny_model

import namm_mlx
from namm_mlx import NAMM, NAMMConfig
from namm_mlx.convert import ConversionError, export_checkpoint
from namm_mlx.features import key_norm_feature

CONFIG = NAMMConfig(update_interval=32, key_norm_input=True)


def _namm(seed: int = 0, weight_on_key_norm: float = 3.0) -> NAMM:
    """Random weights whose read-out leans on the key-norm input."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(0.0, 0.05, CONFIG.param_size).astype(np.float32)
    namm = NAMM.from_flat(flat, np.zeros(17, np.float32), np.ones(17, np.float32), CONFIG)
    readout = np.array(namm.weights.readout_weight)
    readout[-1, 0] = weight_on_key_norm
    namm.weights.readout_weight = mx.array(readout)
    return namm


def test_the_setting_adds_one_input_and_is_validated():
    assert CONFIG.embed_dim == NAMMConfig().embed_dim + 1 == 26
    assert CONFIG.param_size > NAMMConfig().param_size == 4172
    assert NAMMConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(ValueError, match="key_norm_input must be true or false"):
        NAMMConfig(key_norm_input=1)


def test_the_feature_ranks_short_keys_first_within_each_head():
    keys = mx.array(np.random.default_rng(0).normal(size=(2, 3, 40, 8)).astype(np.float32))
    feature = np.array(key_norm_feature(keys))[..., 0]
    norms = np.linalg.norm(np.array(keys), axis=-1)
    assert feature.shape == (2, 3, 40)
    np.testing.assert_allclose(feature.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(feature.std(-1), 1.0, atol=1e-4)
    assert (np.argsort(feature, axis=-1) == np.argsort(-norms, axis=-1)).all()


def test_scores_follow_the_keys_and_need_them():
    namm = _namm()
    rng = np.random.default_rng(1)
    attn = mx.array(np.tril(rng.random((1, 2, 32, 32))).astype(np.float32) / 32)
    positions = mx.broadcast_to(mx.arange(32)[None, None], (1, 2, 32))
    keys = mx.array(rng.normal(size=(1, 2, 32, 8)).astype(np.float32))
    scores = np.array(namm.score(attn, positions, keys=keys)[0])
    shorter = np.array(keys)
    shorter[..., 5, :] *= 0.01  # token 5 gets by far the shortest key in every head
    rescored = np.array(namm.score(attn, positions, keys=mx.array(shorter))[0])
    assert (rescored[..., 5] > scores[..., 5]).all()
    assert (np.argmax(rescored, axis=-1) == 5).all()
    with pytest.raises(ValueError, match="reads key norms"):
        namm.score(attn, positions)


def test_a_key_norm_namm_evicts_saves_and_resumes_from_a_prompt_cache(tmp_path):
    namm = _namm()
    folder = namm.save(tmp_path / "kn")
    loaded_namm = NAMM.load(folder)
    assert loaded_namm.config.key_norm_input
    np.testing.assert_array_equal(loaded_namm.to_flat(), namm.to_flat())

    model = tiny_model("llama", seed=3)
    namm_mlx.attach(model, loaded_namm, max_kv_size=40)
    cache = make_prompt_cache(model)
    prompt = np.random.default_rng(2).integers(0, VOCAB, 80)
    model(mx.array([prompt.tolist()]), cache=cache)
    mx.eval([c.state for c in cache])
    assert all(c.steps >= 1 and c.length <= 40 for c in cache)
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, {"model": "tiny-llama"})
    live = copy.deepcopy(cache)
    restored = load_prompt_cache(path)
    assert restored[0].scorer.namm.config.key_norm_input

    def tokens(c):
        follow_up = mx.array(np.random.default_rng(7).integers(0, VOCAB, 30), dtype=mx.int32)
        return [int(t) for t, _ in generate_step(follow_up, model, prompt_cache=c, max_tokens=40, prefill_step_size=16)]

    assert tokens(restored) == tokens(live)
    assert restored[0].steps >= 2


def test_a_key_norm_namm_keeps_the_short_keys_a_plain_one_would_not(tmp_path):
    model = tiny_model("llama", seed=3)
    prompt = mx.array([np.random.default_rng(2).integers(0, VOCAB, 64).tolist()])
    kept = {}
    for name, weight in (("with", 3.0), ("without", 0.0)):
        namm_mlx.attach(model, _namm(weight_on_key_norm=weight), max_kv_size=24)
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        c = cache[0]
        mx.eval(c.state)
        kept[name] = np.array(c.kept_positions[0])
        norms = np.linalg.norm(np.array(c.keys[0, :, : c.length]), axis=-1)
        kept[name + "_norm"] = norms.mean()
        namm_mlx.detach(model)
    assert not np.array_equal(kept["with"], kept["without"])
    assert kept["with_norm"] < kept["without_norm"]


def test_export_refuses_a_namm_the_reference_cannot_read(tmp_path):
    folder = _namm().save(tmp_path / "kn")
    with pytest.raises(ConversionError, match="reads key norms"):
        export_checkpoint(folder, tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()
