"""The evicting cache inside real mlx-lm models (tiny random ones, every family).

* With a NAMM that keeps everything (theta = 0) generation through stock
  ``mlx_lm.generate_step`` equals stock ``KVCache`` generation.
* With real eviction over several NAMM steps, the compacted cache gives the
  same outputs as a full cache in which the evicted tokens are masked per head
  (a reference that shares none of the cache's storage or position logic).
* Prompt caches round-trip through mlx-lm's save/load and generation continues
  identically; budgets, trimming and unsupported families behave.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, _BaseCache, load_prompt_cache, make_prompt_cache, save_prompt_cache
from tiny_models import SUPPORTED, VOCAB, tiny_model

import namm_mlx
from namm_mlx import NAMM, EvictingKVCache, NAMMConfig, UnsupportedModelError
from namm_mlx.policies import NAMMScorer

INTERVAL = 32  # small cadence so short sequences get several steps
CONFIG = NAMMConfig(update_interval=INTERVAL)


@pytest.fixture(scope="module")
def fixture_namm(reference_conversion) -> NAMM:
    e = reference_conversion
    return NAMM.from_flat(e["param_vector"], e["norm.mean"], e["norm.var"], CONFIG)


def prompt_tokens(n: int, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, n), dtype=mx.int32)


def run_generate_step(model, prompt: mx.array, cache, max_tokens: int, prefill_step_size: int = 16):
    """Greedy tokens and log-probs through mlx-lm's own generation loop."""
    tokens, logprobs = [], []
    for token, lp in generate_step(
        prompt, model, prompt_cache=cache, max_tokens=max_tokens, prefill_step_size=prefill_step_size
    ):
        tokens.append(int(token))
        logprobs.append(np.asarray(lp))
    return tokens, np.stack(logprobs)


@pytest.mark.parametrize("family", SUPPORTED)
def test_keep_everything_equals_stock_cache(family):
    model = tiny_model(family)
    prompt = prompt_tokens(100)
    stock_tokens, stock_lp = run_generate_step(model, prompt, make_prompt_cache(model), 30)
    namm_mlx.attach(model, NAMM.zeros(CONFIG))
    cache = make_prompt_cache(model)
    evicting = [c for c in cache if isinstance(c, EvictingKVCache)]
    assert evicting, "attach must give the model evicting caches"
    tokens, lp = run_generate_step(model, prompt, cache, 30)
    assert tokens == stock_tokens
    np.testing.assert_allclose(lp, stock_lp, atol=1e-5, rtol=0)
    # Steps ran (at 32, 64, 96, 128) and kept every token.
    assert all(c.steps >= 4 and c.length == c.offset for c in evicting)
    if family == "gemma3_text":
        assert any(type(c).__name__ == "RotatingKVCache" for c in cache), "sliding layers keep their cache"


class MaskedFullCache(_BaseCache):
    """Test reference: keeps every token and hides evicted ones with a per-head mask."""

    def __init__(self) -> None:
        self.keys = self.values = self.alive = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        B, H, S, _ = keys.shape
        fresh = mx.ones((B, H, S), dtype=mx.bool_)
        if self.keys is None:
            self.keys, self.values, self.alive = keys, values, fresh
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
            self.alive = mx.concatenate([self.alive, fresh], axis=2)
        self.offset += S
        return self.keys, self.values

    def make_mask(self, N, return_array=False, window_size=None):
        return None if N == 1 else "causal"

    def attend(self, queries, keys, values, scale, mask, sinks=None):
        B, Hq, L, _ = queries.shape
        H, N = keys.shape[1], keys.shape[2]
        causal = mx.arange(N)[None, :] <= (N - L + mx.arange(L))[:, None]
        alive = mx.repeat(self.alive, Hq // H, axis=1)[:, :, None, :]
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=causal & alive)

    def evict_to(self, kept_positions: np.ndarray) -> None:
        alive = np.zeros(self.alive.shape, dtype=bool)
        np.put_along_axis(alive, kept_positions.astype(np.int64), True, axis=2)
        self.alive = mx.array(alive)

    @property
    def state(self):
        return self.keys, self.values


def chunks(tokens: list[int], prefill: int, step: int = 16):
    """Prompt in ``step``-token chunks, then one token at a time."""
    for start in range(0, prefill, step):
        yield tokens[start : min(prefill, start + step)]
    for t in tokens[prefill:]:
        yield [t]


@pytest.mark.parametrize("family", SUPPORTED)
def test_eviction_equals_masked_full_cache(family, fixture_namm):
    model = tiny_model(family)
    namm_mlx.attach(model, fixture_namm, max_kv_size=48)
    cache = model.make_cache()
    evicting = {i: c for i, c in enumerate(cache) if isinstance(c, EvictingKVCache)}
    prompt = [int(t) for t in prompt_tokens(100)]

    # 1) Evicting run: prompt in 16-token chunks, then greedy decoding; record each step.
    schedule = list(chunks(prompt, len(prompt)))
    tokens, logits, events = list(prompt), [], []
    for step in range(len(schedule) + 60):
        chunk = schedule[step] if step < len(schedule) else [tokens[-1]]
        steps_before = {i: c.steps for i, c in evicting.items()}
        out = model(mx.array([chunk]), cache=cache)
        logits.append(np.asarray(out[0, -1]))
        events.append({i: np.asarray(c.kept_positions) for i, c in evicting.items() if c.steps > steps_before[i]})
        if step >= len(schedule) - 1:
            tokens.append(int(np.argmax(logits[-1])))
    evicted_steps = sum(1 for e in events for i, kept in e.items() if kept.shape[-1] < evicting[i].offset)
    assert sum(1 for e in events if e) >= 3, "at least three NAMM steps must run"
    assert evicted_steps >= 3, "the steps must actually evict"
    assert all(c.length <= 48 + INTERVAL for c in evicting.values())

    # 2) Reference: same model, full storage, evicted tokens masked from the same forward on.
    namm_mlx.detach(model)
    reference = [MaskedFullCache() if type(c) is KVCache else c for c in make_prompt_cache(model)]
    ref_tokens = list(prompt)
    for step in range(len(logits)):
        chunk = schedule[step] if step < len(schedule) else [ref_tokens[-1]]
        out = model(mx.array([chunk]), cache=reference)
        ref_logits = np.asarray(out[0, -1])
        np.testing.assert_allclose(ref_logits, logits[step], atol=2e-4, rtol=1e-4, err_msg=f"forward {step}")
        if step >= len(schedule) - 1:
            ref_tokens.append(int(np.argmax(ref_logits)))
        for i, kept in events[step].items():
            reference[i].evict_to(kept)
    assert ref_tokens == tokens


def test_positions_never_renumbered(fixture_namm):
    model = tiny_model("llama")
    namm_mlx.attach(model, fixture_namm, max_kv_size=20)
    cache = model.make_cache()
    model(mx.array([[int(t) for t in prompt_tokens(64)]]), cache=cache)
    c = cache[0]
    assert c.offset == 64 and c.length == 20 and c.steps == 1
    positions = np.asarray(c.kept_positions)
    assert (np.diff(positions, axis=-1) > 0).all() and (positions[..., -1] == 63).all()
    # Heads keep different tokens but the same count.
    assert not np.array_equal(positions[0, 0], positions[0, 1])


def test_prompt_cache_round_trip(fixture_namm, tmp_path):
    model = tiny_model("qwen3")
    namm_mlx.attach(model, fixture_namm, max_kv_size=40)
    cache = make_prompt_cache(model)
    model(mx.array([[int(t) for t in prompt_tokens(80)]]), cache=cache)
    mx.eval([c.state for c in cache])
    assert all(c.steps == 1 and c.length == 40 for c in cache)
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, {"model": "tiny-qwen3"})
    live = copy.deepcopy(cache)
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta["model"] == "tiny-qwen3"
    assert [type(c).__name__ for c in loaded] == ["EvictingKVCache"] * len(cache)
    np.testing.assert_array_equal(loaded[0].scorer.namm.to_flat(), fixture_namm.to_flat())
    follow_up = prompt_tokens(30, seed=7)
    live_tokens, live_lp = run_generate_step(model, follow_up, live, 40)
    loaded_tokens, loaded_lp = run_generate_step(model, follow_up, loaded, 40)
    assert loaded_tokens == live_tokens
    np.testing.assert_array_equal(loaded_lp, live_lp)
    assert loaded[0].steps == live[0].steps >= 2


def test_budget_trim_and_nbytes():
    model = tiny_model("llama")
    namm_mlx.attach(model, NAMM.zeros(CONFIG), max_kv_size=24)
    cache = make_prompt_cache(model)
    model(mx.array([[1] * 20]), cache=cache)
    c = cache[0]
    assert c.is_trimmable() and c.trim(5) == 5 and c.offset == 15
    model(mx.array([[2] * 17]), cache=cache)  # reaches 32: a step, capped at 24
    assert c.steps == 1 and c.length == 24 and c.offset == 32
    assert not c.is_trimmable() and c.trim(3) == 0
    full = KVCache()
    full.update_and_fetch(*(mx.zeros((1, 2, 32, 16)),) * 2)
    assert 0 < c.kv_nbytes < full.nbytes
    assert c.nbytes >= c.kv_nbytes


def test_unsupported_family_fails_clearly():
    model = tiny_model("gemma2")
    with pytest.raises(UnsupportedModelError, match="gemma2"):
        namm_mlx.attach(model, NAMM.zeros(CONFIG))
    assert "make_cache" not in model.__dict__, "a failed attach leaves the model untouched"
    # The runtime guard: caches forced onto such a model refuse the second update.
    cache = [EvictingKVCache(NAMMScorer(NAMM.zeros(CONFIG))) for _ in model.layers]
    model(mx.array([[1, 2]]), cache=cache)
    with pytest.raises(UnsupportedModelError, match="did not run"):
        model(mx.array([[3]]), cache=cache)
