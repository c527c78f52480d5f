"""Baseline policies: each one's choice of tokens on designed attention
patterns, all of them inside real mlx-lm generation through the one evicting
cache, and their prompt caches round-tripping.

Attention patterns are built numerically: keys are zero except for a few
"target" tokens whose key is a unit vector, queries are unit vectors, and the
scale is large, so a query aligned with a target's key attends (almost) only
to it. The cache is driven exactly as the attention hook drives it:
``update_and_fetch`` then ``attend(..., mask="causal")``.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from tiny_models import VOCAB, tiny_model

import namm_mlx
from namm_mlx import NAMM, EvictingKVCache, NAMMConfig
from namm_mlx.cache import evict_now
from namm_mlx.policies import (
    NEVER,
    POLICY_NAMES,
    REGISTRY,
    FullScorer,
    H2OScorer,
    KNormScorer,
    NAMMScorer,
    RandomScorer,
    SnapKVScorer,
    StreamingScorer,
    TOVAScorer,
    make_scorer,
    scorer_from_spec,
)

SCALE = 10.0  # attention logit of an aligned unit query/key pair: softmax weight ~ e^10
N, H, D = 20, 2, 4
E = np.eye(D, dtype=np.float32)
INTERVAL = 32


# ---------------------------------------------------------------- helpers
def pattern(targets: list[dict[int, int]], query_dirs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Keys [1, H, N, D] zero except ``targets[h][token] = direction``; queries
    [1, H, N, D] with row ``i`` of head ``h`` along ``query_dirs[h][i]``."""
    keys = np.zeros((1, H, N, D), np.float32)
    queries = np.zeros((1, H, N, D), np.float32)
    for h in range(H):
        for token, direction in targets[h].items():
            keys[0, h, token] = E[direction]
        for i, direction in enumerate(query_dirs[h]):
            queries[0, h, i] = E[direction]
    return keys, queries


def drive(scorer, keys: np.ndarray, queries: np.ndarray, chunk: int = N, **budget) -> EvictingKVCache:
    """Feed the tokens through a real cache in ``chunk``-token forwards."""
    cache = EvictingKVCache(scorer, **budget)
    feed(cache, keys, queries, 0, keys.shape[2], chunk)
    return cache


def feed(cache: EvictingKVCache, keys, queries, start: int, stop: int, chunk: int) -> None:
    """Tokens ``start:stop``; values carry each token's position in every channel."""
    B, Hk, _, Dk = keys.shape
    for s in range(start, stop, chunk):
        e = min(stop, s + chunk)
        values = mx.broadcast_to(mx.arange(s, e, dtype=mx.float32)[:, None], (B, Hk, e - s, Dk))
        k, v = cache.update_and_fetch(mx.array(keys[:, :, s:e]), values)
        cache.attend(mx.array(queries[:, :, s:e]), k, v, scale=SCALE, mask="causal" if e - s > 1 else None)


def kept(cache: EvictingKVCache) -> list[list[int]]:
    """Kept positions per head (batch 0), checked against the gathered values."""
    assert cache.steps >= 1, "no eviction step ran"
    positions = np.asarray(cache.kept_positions)[0]
    values = np.asarray(cache.values[:, :, : positions.shape[-1], 0])[0]
    np.testing.assert_array_equal(values, positions, err_msg="values were not gathered with their positions")
    return [sorted(int(p) for p in head) for head in positions]


def prompt_tokens(n: int, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, n), dtype=mx.int32)


def run_generate_step(model, prompt: mx.array, cache, max_tokens: int):
    tokens, logprobs = [], []
    for token, lp in generate_step(prompt, model, prompt_cache=cache, max_tokens=max_tokens, prefill_step_size=16):
        tokens.append(int(token))
        logprobs.append(np.asarray(lp))
    return tokens, np.stack(logprobs)


def causal_attention_np(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Independent reference: softmax(scale q k^T) with a causal mask, [B, H, N, N]."""
    logits = SCALE * queries.astype(np.float64) @ np.swapaxes(keys.astype(np.float64), -1, -2)
    n = logits.shape[-1]
    logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


# ------------------------------------------------- 1. selection per policy
def test_streaming_keeps_sinks_and_recent():
    keys, queries = pattern([{}, {}], [[0] * N] * H)
    cache = drive(StreamingScorer(sinks=4, interval=N), keys, queries, chunk=5, max_kv_size=10)
    assert kept(cache) == [[0, 1, 2, 3, *range(14, 20)]] * H
    # A budget below sinks + 1: the earliest sinks win, the newest token stays.
    cache = drive(StreamingScorer(sinks=4, interval=N), keys, queries, max_kv_size=3)
    assert kept(cache) == [[0, 1, 19]] * H


def test_h2o_keeps_heavy_hitters_and_recent_window():
    targets = [{2: 0, 5: 0, 9: 0, 11: 0}, {3: 0, 6: 0, 8: 0, 12: 0}]
    keys, queries = pattern(targets, [[0] * N] * H)
    cache = drive(H2OScorer(recent_window=4, interval=N), keys, queries, chunk=5, max_kv_size=8)
    # Heavy hitters: the tokens every later query attends to; recent: 16..19
    # (which received almost no attention but are protected).
    assert kept(cache) == [[2, 5, 9, 11, 16, 17, 18, 19], [3, 6, 8, 12, 16, 17, 18, 19]]
    # Without the recent window the same budget goes to attention only: token 0
    # (all of query 0's attention, half of query 1's) beats the recent tokens.
    cache = drive(H2OScorer(recent_window=0, interval=N), keys, queries, max_kv_size=6)
    assert kept(cache) == [[0, 2, 5, 9, 11, 19], [0, 3, 6, 8, 12, 19]]


def test_snapkv_scores_the_observation_window_with_pooling():
    # Early queries (rows 0..15) look at token 2 (both heads); the observation
    # window (last 4 rows) looks at token 7 in head 0 and token 12 in head 1.
    targets = [{2: 1, 7: 0}, {2: 1, 12: 0}]
    queries = [[1] * 16 + [0] * 4] * H
    keys, queries = pattern(targets, queries)
    cache = drive(SnapKVScorer(window=4, kernel=5, interval=N), keys, queries, max_kv_size=9)
    # Max-pooling over 5 tokens keeps the target's neighbours; token 2, which
    # only earlier queries attended to, is dropped; the window stays.
    assert kept(cache) == [[5, 6, 7, 8, 9, 16, 17, 18, 19], [10, 11, 12, 13, 14, 16, 17, 18, 19]]
    cache = drive(SnapKVScorer(window=4, kernel=1, interval=N), keys, queries, max_kv_size=5)
    assert kept(cache) == [[7, 16, 17, 18, 19], [12, 16, 17, 18, 19]]
    # H2O on the same pattern prefers token 2 (most attention overall).
    cache = drive(H2OScorer(recent_window=4, interval=N), keys, queries, max_kv_size=5)
    assert kept(cache) == [[2, 16, 17, 18, 19]] * H


def test_tova_uses_the_last_query_shared_across_heads():
    # Every query but the last looks at token 5; the last one looks at token 3
    # in head 0 and token 10 in head 1. TOVA averages over heads, so both heads
    # keep both tokens.
    targets = [{5: 1, 3: 0}, {5: 1, 10: 0}]
    keys, queries = pattern(targets, [[1] * (N - 1) + [0]] * H)
    cache = drive(TOVAScorer(interval=N), keys, queries, chunk=7, max_kv_size=3)
    assert kept(cache) == [[3, 10, 19]] * H


def test_knorm_keeps_the_lowest_key_norms():
    rng = np.random.default_rng(0)
    norms = np.stack([rng.permutation(N) + 1.0 for _ in range(H)]).astype(np.float32)
    keys = norms[None, :, :, None] * (np.ones(D, np.float32) / 2.0)
    queries = np.zeros_like(keys)
    cache = drive(KNormScorer(interval=N), keys, queries, keep_fraction=0.25)  # 5 of 20
    expected = [sorted([*np.argsort(norms[h, :-1])[:4].tolist(), N - 1]) for h in range(H)]
    assert kept(cache) == expected
    assert expected[0] != expected[1]


def test_random_is_seeded_and_respects_the_budget():
    keys, queries = pattern([{}, {}], [[0] * N] * H)
    a = kept(drive(RandomScorer(seed=3, interval=N), keys, queries, max_kv_size=7))
    b = kept(drive(RandomScorer(seed=3, interval=N), keys, queries, chunk=4, max_kv_size=7))
    c = kept(drive(RandomScorer(seed=4, interval=N), keys, queries, max_kv_size=7))
    assert a == b, "same seed and step: same choice"
    assert a != c, "another seed: another choice"
    assert all(len(head) == 7 and head[-1] == N - 1 for head in a + c)
    assert a[0] != a[1], "heads draw independently"


def test_full_never_steps():
    keys, queries = pattern([{}, {}], [[0] * N] * H)
    cache = drive(FullScorer(), keys, queries, chunk=3, keep_fraction=0.25)
    assert cache.steps == 0 and cache.length == cache.offset == N
    assert cache.queries is None, "full needs no query buffer"
    assert FullScorer().interval == NEVER


# ------------------------------------------- 2. every policy in mlx-lm
def policy_scorer(name: str):
    if name == "namm":
        return make_scorer("namm", namm=NAMM.zeros(NAMMConfig(update_interval=INTERVAL)))
    return make_scorer(name, interval=INTERVAL)  # full ignores the interval


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_runs_in_the_one_cache(name, tmp_path):
    model = tiny_model("llama")
    scorer = policy_scorer(name)
    namm_mlx.attach(model, scorer, keep_fraction=0.5)
    cache = make_prompt_cache(model)
    assert all(isinstance(c, EvictingKVCache) and c.scorer is scorer for c in cache)
    tokens, lp = run_generate_step(model, prompt_tokens(100), cache, 20)
    assert len(tokens) == 20 and np.isfinite(lp).all()
    for c in cache:
        assert c.offset >= 118
        if name == "full":
            assert c.steps == 0 and c.length == c.offset
            continue
        assert c.steps >= 3, "steps at 32, 64 and 96"
        kept_at_step = c.length - (c.offset - c.last_step_offset)
        assert c.last_step_offset == 96
        assert kept_at_step == math.ceil(0.5 * c.last_step_offset) == 48
        assert c.kept_positions.shape[-1] == 48 and len(c.scorer_state) == (2 if name == "namm" else int(name == "h2o"))

    # Prompt cache round trip: same policy, same spec, same continuation.
    path = str(tmp_path / f"{name}.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    for a, b in zip(cache, loaded):
        assert type(b.scorer) is type(a.scorer) and b.scorer.spec() == a.scorer.spec()
        assert (b.offset, b.length, b.steps, b.num_queries) == (a.offset, a.length, a.steps, a.num_queries)
        for x, y in zip(a.scorer_state, b.scorer_state, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    follow_up = prompt_tokens(10, seed=5)  # crosses the step at 128 (the NAMM waits for its hop)
    live_tokens, live_lp = run_generate_step(model, follow_up, cache, 20)
    loaded_tokens, loaded_lp = run_generate_step(model, follow_up, loaded, 20)
    assert loaded_tokens == live_tokens
    np.testing.assert_array_equal(loaded_lp, live_lp)
    if name != "full":
        assert loaded[0].steps == cache[0].steps >= 4


def test_factory_and_registry(tmp_path):
    assert set(POLICY_NAMES) <= set(REGISTRY)
    for name in POLICY_NAMES:
        if name == "namm":
            continue
        scorer = make_scorer(name)
        assert scorer.name == name and scorer.granularity == 1 and scorer.arrays() == {}
        rebuilt = scorer_from_spec(scorer.spec(), {})
        assert type(rebuilt) is type(scorer) and rebuilt.spec() == scorer.spec()
        if name != "full":
            assert scorer.interval == (NEVER if name == "snapkv" else 512)
    custom = make_scorer("snapkv", window=8, kernel=3, pooling="avg", interval=64)
    assert scorer_from_spec(custom.spec(), {}).spec() == custom.spec() == {
        "policy": "snapkv", "window": 8, "kernel": 3, "pooling": "avg", "interval": 64,
    }
    assert make_scorer("h2o", recent_window=7).spec()["recent_window"] == 7
    assert make_scorer("streaming", sinks=2).spec()["sinks"] == 2
    assert make_scorer("random", seed=9).spec()["seed"] == 9
    NAMM.zeros(NAMMConfig(update_interval=INTERVAL)).save(tmp_path / "namm")
    from_folder = make_scorer("namm", namm=tmp_path / "namm")
    assert isinstance(from_folder, NAMMScorer) and from_folder.interval == INTERVAL
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_scorer("lru")
    with pytest.raises(TypeError):
        make_scorer("namm")
    with pytest.raises(TypeError, match="bad parameters"):
        make_scorer("tova", window=3)
    with pytest.raises(ValueError):
        make_scorer("snapkv", kernel=4)


# --------------------------------------------------- 3. policy dynamics
def test_h2o_accumulates_attention_across_steps():
    targets = [{2: 0, 9: 0}, {4: 0, 13: 0}]
    keys, queries = pattern(targets, [[0] * N] * H)
    # No budget: after four steps the carried sums equal the column sums of the
    # whole causal attention matrix, computed independently.
    cache = drive(H2OScorer(recent_window=2, interval=5), keys, queries, chunk=5)
    assert cache.steps == 4 and cache.length == N
    expected = causal_attention_np(queries, keys).sum(axis=2)
    np.testing.assert_allclose(np.asarray(cache.scorer_state[0]), expected, rtol=1e-5, atol=1e-5)
    # With eviction the sums are gathered with their tokens and keep growing.
    cache = EvictingKVCache(H2OScorer(recent_window=2, interval=5), max_kv_size=6)
    history = []
    for start in range(0, N, 5):
        feed(cache, keys, queries, start, start + 5, 5)
        positions = np.asarray(cache.kept_positions)[0, 0]
        assert 2 in positions, "the heavy hitter stays"
        history.append(float(np.asarray(cache.scorer_state[0])[0, 0, list(positions).index(2)]))
        assert cache.scorer_state[0].shape[-1] == cache.length
    assert cache.steps == 4 and all(b > a + 0.3 for a, b in zip(history, history[1:])), history


def test_snapkv_is_one_shot():
    model = tiny_model("llama")
    # An explicit interval beyond the run: no periodic step can happen (the
    # default, interval=None, is the same policy).
    namm_mlx.attach(model, make_scorer("snapkv", window=8, interval=4096), keep_fraction=0.5)
    cache = make_prompt_cache(model)
    prompt = [int(t) for t in prompt_tokens(100)]
    for start in range(0, 100, 16):
        model(mx.array([prompt[start : start + 16]]), cache=cache)
    assert all(c.steps == 0 and c.length == 100 and c.num_queries == 100 for c in cache)
    assert evict_now(cache) == len(cache)
    for c in cache:
        assert c.steps == 1 and c.length == 50
        assert (np.asarray(c.kept_positions)[..., -8:] == np.arange(92, 100)).all(), "the window stays"
    tokens, _ = run_generate_step(model, mx.array(prompt[-1:]), cache, 10)
    assert all(c.steps == 1 and c.length == 50 + c.offset - 100 for c in cache), "no periodic steps"
    assert evict_now(cache) == len(cache) and all(c.length == math.ceil(0.5 * c.offset) for c in cache)


def test_snapkv_default_one_shot_runs():
    model = tiny_model("llama")
    namm_mlx.attach(model, make_scorer("snapkv"), keep_fraction=0.5)
    cache = make_prompt_cache(model)
    model(mx.array([[int(t) for t in prompt_tokens(40)]]), cache=cache)
    assert evict_now(cache) == len(cache) and all(c.length == 20 for c in cache)
    # Decoding after the one-shot step buffers only about the window, not every query.
    run_generate_step(model, mx.array([1]), cache, 300)
    assert all(c.steps == 1 and c.num_queries <= 2 * 32 + c.step for c in cache)


def test_streaming_keeps_exactly_sinks_and_most_recent_in_a_model():
    model = tiny_model("llama")
    namm_mlx.attach(model, make_scorer("streaming", sinks=4, interval=INTERVAL), max_kv_size=24)
    cache = make_prompt_cache(model)
    prompt = [int(t) for t in prompt_tokens(100)]
    for start in range(0, 100, 16):
        model(mx.array([prompt[start : start + 16]]), cache=cache)
    expected = np.array([0, 1, 2, 3, *range(76, 96)])
    for c in cache:
        assert c.steps == 3 and c.length == 24 + 4
        positions = np.asarray(c.kept_positions)
        assert (positions == expected).all()


# ------------------------------------------- one-shot policies on a shared prefill
ONE_SHOT_POLICIES = {
    "h2o": dict(recent_window=4),
    "snapkv": dict(window=8),
    "tova": {},
    "knorm": {},
    "streaming": dict(sinks=2),
    "random": dict(seed=3),
}


@pytest.mark.parametrize("n_tokens", [96, 100])  # the recorder's last step at the prompt's end, or before it
@pytest.mark.parametrize("name", sorted(ONE_SHOT_POLICIES))
def test_fork_of_a_shared_prefill_equals_the_policy_own_prefill(name, n_tokens):
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((1, H, n_tokens, D)).astype(np.float32) / 3
    queries = rng.standard_normal((1, H, n_tokens, D)).astype(np.float32) / 3
    params = ONE_SHOT_POLICIES[name]
    # The policy's own one-shot run: prefill without eviction, then compress once.
    own = EvictingKVCache(make_scorer(name, interval=None, **params), keep_fraction=0.4)
    feed(own, keys, queries, 0, n_tokens, INTERVAL)
    assert own.steps == 0 and evict_now([own]) == 1
    # The shared prefill: an unbudgeted H2O that steps (and evicts nothing) every
    # INTERVAL tokens, retaining the last queries; then a fork per policy.
    shared = EvictingKVCache(H2OScorer(recent_window=4, interval=INTERVAL, retain_queries=8))
    feed(shared, keys, queries, 0, n_tokens, INTERVAL)
    assert shared.steps == n_tokens // INTERVAL and shared.length == n_tokens
    before = np.asarray(shared.keys[:, :, :n_tokens])
    fork = shared.fork(make_scorer(name, interval=None, **params), keep_fraction=0.4)
    assert evict_now([fork], force=True) == 1
    assert kept(fork) == kept(own)
    assert fork.length == own.length == math.ceil(0.4 * n_tokens)
    # the source is untouched and can serve the next fork
    assert shared.length == n_tokens and np.array_equal(np.asarray(shared.keys[:, :, :n_tokens]), before)
    # decoding after the one-shot step never steps again
    feed(fork, np.concatenate([keys, keys[:, :, :40]], axis=2), np.concatenate([queries, queries[:, :, :40]], axis=2),
         n_tokens, n_tokens + 40, 1)
    assert fork.steps == shared.steps + 1 and fork.length == own.length + 40


def test_fork_refuses_a_window_the_source_did_not_keep():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, H, 64, D)).astype(np.float32)
    shared = EvictingKVCache(H2OScorer(interval=INTERVAL, retain_queries=4))
    feed(shared, keys, keys, 0, 64, INTERVAL)
    with pytest.raises(ValueError, match="needs the last 8 queries but only 4"):
        shared.fork(make_scorer("snapkv", window=8))


def test_namm_recent_window_keeps_the_newest_tokens(reference_namm):
    """``recent_window`` (a NAMM config option) keeps the W newest tokens whatever
    they score, under a budget and at the threshold alike; 0 is the reference."""
    rng = np.random.default_rng(3)
    n, window = 64, 12
    keys = rng.normal(size=(1, H, n, D)).astype(np.float32)
    queries = rng.normal(size=(1, H, n, D)).astype(np.float32)
    config = dict(reference_namm.config.to_dict(), update_interval=32)

    def namm_with(**overrides) -> NAMM:
        # the read-out negated: this NAMM prefers old tokens, so recency must come from the window
        w = reference_namm
        weights = dataclasses.replace(w.weights, readout_weight=-w.weights.readout_weight)
        return NAMM(weights, w.norm_mean, w.norm_var, NAMMConfig(**{**config, **overrides}))

    newest = set(range(n - window, n))
    for budget in ({"max_kv_size": 20}, {}):
        ranked = bool(budget)
        plain = drive(NAMMScorer(namm_with(), ranked=ranked), keys, queries, chunk=16, **budget)
        assert any(not newest <= set(head) for head in kept(plain)), "the test needs a NAMM that drops recent tokens"
        protected = drive(NAMMScorer(namm_with(recent_window=window), ranked=ranked), keys, queries, chunk=16, **budget)
        assert all(newest <= set(head) for head in kept(protected)), kept(protected)
    # a budget below the window keeps the newest first
    small = drive(NAMMScorer(namm_with(recent_window=window), ranked=True), keys, queries, chunk=16, max_kv_size=5)
    assert kept(small) == [list(range(n - 5, n))] * H
    with pytest.raises(ValueError, match="recent_window"):
        NAMMConfig(recent_window=-1)


def test_namm_newest_query_weight_mixes_in_what_the_newest_query_reads(reference_namm):
    """``newest_query_weight`` w scores ``(1 - w) * BAM + w * log(N * a + 1e-3)``
    with ``a`` the newest query's attention in the token's own KV head; 0 is the
    reference. At w = 1 a NAMM keeps what each head's newest query reads (per
    head, where TOVA shares one choice over the layer's heads)."""
    from namm_mlx.policies.namm import mix_newest_query

    attn = mx.array([[[[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.25, 0.0]]]])  # [B, H, n, N]
    scores = mx.array([[[1.0, -1.0, 2.0, 0.0]]])
    expected = 0.25 * np.array([1.0, -1.0, 2.0, 0.0]) + 0.75 * np.log(4 * np.array([0.5, 0.25, 0.25, 0.0]) + 1e-3)
    np.testing.assert_allclose(np.array(mix_newest_query(scores, attn, 0.75))[0, 0], expected, rtol=1e-6)

    # every query but the last reads token 5; the last reads token 3 in head 0 and 10 in head 1
    keys, queries = pattern([{5: 1, 3: 0}, {5: 1, 10: 0}], [[1] * (N - 1) + [0]] * H)
    newest = NAMM.zeros(NAMMConfig(n_fft=8, hop=4, update_interval=N, newest_query_weight=1.0))
    cache = drive(NAMMScorer(newest, ranked=True), keys, queries, chunk=10, max_kv_size=2)
    assert kept(cache) == [[3, 19], [10, 19]]

    rng = np.random.default_rng(4)
    keys = rng.normal(size=(1, H, 64, D)).astype(np.float32)
    queries = rng.normal(size=(1, H, 64, D)).astype(np.float32)
    plain = reference_namm.with_config(update_interval=32)
    runs = {x: kept(drive(NAMMScorer(namm, ranked=True), keys, queries, chunk=16, max_kv_size=20))
            for x, namm in (("plain", plain), (0.0, plain.with_config(newest_query_weight=0.0)),
                            (0.5, plain.with_config(newest_query_weight=0.5)))}
    assert runs[0.0] == runs["plain"] and runs[0.5] != runs["plain"]
    # at the threshold the BAM (whose scores it was calibrated on) says how many
    # and the mix says which: one step over the 64 tokens, so both see the same
    one_step = lambda x: reference_namm.with_config(update_interval=64, newest_query_weight=x)
    at_threshold = {x: kept(drive(NAMMScorer(one_step(x)), keys, queries, chunk=16)) for x in (0.0, 1.0)}
    assert [len(h) for h in at_threshold[1.0]] == [len(h) for h in at_threshold[0.0]] != [64, 64]
    assert at_threshold[1.0] != at_threshold[0.0]
    with pytest.raises(ValueError, match="newest_query_weight"):
        NAMMConfig(newest_query_weight=1.5)


def test_export_refuses_a_namm_that_mixes_in_the_newest_query(tmp_path):
    from namm_mlx.convert import ConversionError, export_checkpoint

    NAMM.zeros(NAMMConfig()).with_config(newest_query_weight=0.3).save(tmp_path / "mixed")
    assert NAMM.load(tmp_path / "mixed").config.newest_query_weight == 0.3
    with pytest.raises(ConversionError, match="newest_query_weight 0.3"):
        export_checkpoint(tmp_path / "mixed", tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


def test_with_config_changes_settings_but_never_the_weights_shapes(reference_namm):
    changed = reference_namm.with_config(key_probe_share=0.15, newest_query_weight=0.3)
    assert (changed.config.key_probe_share, changed.config.newest_query_weight) == (0.15, 0.3)
    np.testing.assert_array_equal(changed.to_flat(), reference_namm.to_flat())
    assert reference_namm.config.newest_query_weight == 0.0  # the original is left as it was
    with pytest.raises(ValueError, match="hidden_dim: the weights were fitted for 4172 parameters"):
        reference_namm.with_config(hidden_dim=16)
    with pytest.raises(ValueError, match="newest_query_weight"):
        reference_namm.with_config(newest_query_weight=2.0)
