"""The key probe: per-layer linear scores on cached keys that a NAMM keeps first.

Its premise (pair magnitudes do not depend on the RoPE position), its fit (it
learns a planted token kind and marks the share it was asked to), and its
life in a cache: it keeps the marked tokens under a budget where the same
NAMM without it does not, needs each cache's layer index, survives save/load
and mlx-lm's prompt cache, and is refused where the reference format cannot
hold it.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from tiny_models import VOCAB, tiny_model

import namm_mlx
from namm_mlx import NAMM, NAMMConfig
from namm_mlx.convert import ConversionError, export_checkpoint
from namm_mlx.key_probe import (
    SKIP_FIRST,
    document_features,
    fit_probe,
    pair_log_magnitudes,
    probe_scores,
    protect_marked,
    spread_marks,
)
from namm_mlx.policies.base import EvictionContext
from namm_mlx.policies.namm import NAMMScorer

CONFIG = NAMMConfig(update_interval=32)
PLANTED = 7  # the token id whose occurrences are "the facts"


def _namm(probe=None, seed: int = 0) -> NAMM:
    flat = np.random.default_rng(seed).normal(0.0, 0.05, CONFIG.param_size).astype(np.float32)
    return NAMM.from_flat(flat, np.zeros(17, np.float32), np.ones(17, np.float32), CONFIG, key_probe=probe)


def _document(seed: int, n: int, planted: int) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, VOCAB, n)
    where = np.sort(rng.choice(np.arange(SKIP_FIRST, n), planted, replace=False))
    tokens[where] = PLANTED
    return tokens.tolist(), np.isin(np.arange(n), where)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def probe(model):
    documents = [(document_features(model, tokens, step=64), labels)
                 for tokens, labels in (_document(s, 192, 12) for s in (1, 2, 3))]  # fmt: skip
    return fit_probe(documents, marked_share=0.12)


def test_pair_magnitudes_do_not_depend_on_the_position():
    keys = mx.array(np.random.default_rng(0).normal(size=(1, 2, 5, 16)).astype(np.float32))
    rope = nn.RoPE(16, traditional=False)
    near, far = rope(keys, offset=3), rope(keys, offset=900)
    assert not np.allclose(np.array(near), np.array(far), atol=1e-2)
    np.testing.assert_allclose(np.array(pair_log_magnitudes(near)), np.array(pair_log_magnitudes(far)), atol=1e-4)
    assert pair_log_magnitudes(near).shape == (1, 2, 5, 8)


def test_the_fit_learns_a_planted_token_kind_and_marks_the_asked_share(model, probe):
    assert probe.shape == (3, 2, 9) and probe.dtype == np.float32
    tokens, labels = _document(9, 192, 12)  # held out
    features = document_features(model, tokens, step=64)
    # Layer 0's keys depend on the token alone, so its probe can be exact; in
    # deeper layers of a random model the context dominates the keys.
    for layer in range(1):
        keys_free = mx.array(features[layer][None])  # scores straight from the pair features
        scores = np.array((keys_free * mx.array(probe[layer, :, :-1])[None, :, None]).sum(-1)
                          + mx.array(probe[layer, :, -1])[None, :, None])[0]  # fmt: skip
        for head in range(2):
            s, y = scores[head, SKIP_FIRST:], labels[SKIP_FIRST:]
            auc = (s[y][:, None] > s[~y][None, :]).mean()
            assert auc > 0.95, f"layer {layer} head {head}: AUC {auc:.3f} for the planted tokens"
            assert (s[y] >= 0).mean() >= 0.75, f"layer {layer} head {head} marks too few planted tokens"
    train_tokens, _ = _document(1, 192, 12)
    train = document_features(model, train_tokens, step=64)[0, 0, SKIP_FIRST:]
    share = float(((train @ probe[0, 0, :-1] + probe[0, 0, -1]) >= 0).mean())
    assert 0.06 < share < 0.2  # 0.12 over the three training documents


def test_probe_scores_read_the_cache_layout(model, probe):
    keys = mx.array(np.random.default_rng(1).normal(size=(1, 2, 40, 16)).astype(np.float32))
    scores = np.array(probe_scores(keys, mx.array(probe[1])))
    features = np.array(pair_log_magnitudes(keys))[0]
    expected = np.einsum("htp,hp->ht", features, probe[1, :, :-1]) + probe[1, :, -1:]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-4)


def test_a_span_keeps_the_words_before_a_mark_and_the_mark_first():
    marks = mx.array([[-1.0, -1.0, -1.0, 2.0, -1.0, -1.0]])
    spread = np.array(spread_marks(marks, 2))[0]
    assert (spread[[0, 4, 5]] == -1.0).all() and spread[3] == 2.0
    assert 2.0 > spread[2] > spread[1] > 1.9  # the two slots before it, nearer first
    np.testing.assert_array_equal(np.array(spread_marks(marks, 0)), np.array(marks))
    scores = mx.array([[5.0, 0.0, 1.0, -3.0, 4.0, 9.0]])
    lifted = np.array(protect_marked(scores, mx.array(spread[None]), 0.0))[0]
    assert list(np.argsort(-lifted)[:3]) == [3, 2, 1]  # marked slots above every score, surest first
    assert (lifted[[0, 4, 5]] == [5.0, 4.0, 9.0]).all()
    with pytest.raises(ValueError, match="key_probe_span must be an integer from 0 to 4096"):
        NAMMConfig(key_probe_span=-1)


def _kept_after(model, namm, tokens, budget, chunk=None):
    namm_mlx.attach(model, namm, max_kv_size=budget)
    try:
        cache = make_prompt_cache(model)
        chunk = chunk or len(tokens)
        for start in range(0, len(tokens), chunk):
            model(mx.array([tokens[start : start + chunk]]), cache=cache)
            mx.eval([c.state for c in cache])
        return cache, [np.array(c.kept_positions[0]) for c in cache]
    finally:
        namm_mlx.detach(model)


def test_a_probed_namm_keeps_the_marked_tokens_a_plain_one_drops(model, probe):
    tokens, labels = _document(11, 96, 6)
    planted = np.flatnonzero(labels)
    _, with_probe = _kept_after(model, _namm(mx.array(probe)), tokens, budget=24)
    _, without = _kept_after(model, _namm(), tokens, budget=24)
    assert all(np.isin(planted, head).all() for head in with_probe[0]), "layer 0 lost a planted token"
    assert not all(np.isin(planted, head).all() for head in without[0])


def test_a_probed_namm_needs_the_layer_and_the_model_it_was_fitted_for(probe):
    scorer = NAMMScorer(_namm(mx.array(probe)), ranked=True)
    keys = mx.array(np.random.default_rng(0).normal(size=(1, 2, 32, 16)).astype(np.float32))
    attention = mx.softmax(mx.random.normal((1, 2, 32, 32)), axis=-1)
    context = dict(keys=keys, positions=mx.broadcast_to(mx.arange(32)[None, None], (1, 2, 32)), n_new=32,
                   offset=32, state=[], probabilities=attention, probabilities_dtype="bfloat16")  # fmt: skip
    scorer.score(EvictionContext(**context, layer=2))
    with pytest.raises(ValueError, match="needs its layer index"):
        scorer.score(EvictionContext(**context))
    with pytest.raises(ValueError, match="fitted for 3 layers x 2 KV heads of dimension 16"):
        scorer.score(EvictionContext(**{**context, "keys": mx.zeros((1, 2, 32, 8))}, layer=0))


@pytest.mark.parametrize("heads, layers", [("own", "own"), ("mean", "own"), ("max", "mean")])
def test_the_probe_survives_save_load_and_the_prompt_cache(tmp_path, model, probe, heads, layers):
    namm = _namm(mx.array(probe))
    config = dataclasses.replace(CONFIG, key_probe_heads=heads, key_probe_layers=layers)
    namm = NAMM(namm.weights, namm.norm_mean, namm.norm_var, config, key_probe=namm.key_probe)
    folder = namm.save(tmp_path / "probed")
    loaded = NAMM.load(folder)
    np.testing.assert_array_equal(np.array(loaded.key_probe), probe)
    tokens, _ = _document(12, 80, 4)
    namm_mlx.attach(model, loaded, max_kv_size=40)
    try:
        cache = make_prompt_cache(model)
        model(mx.array([tokens]), cache=cache)
        mx.eval([c.state for c in cache])
        path = str(tmp_path / "prompt.safetensors")
        save_prompt_cache(path, cache, {"model": "tiny-llama"})
        live = copy.deepcopy(cache)
        restored = load_prompt_cache(path)
        assert [c.layer for c in restored] == [0, 1, 2]
        np.testing.assert_array_equal(np.array(restored[1].scorer.namm.key_probe), probe)
        assert restored[1].scorer.namm.config.key_probe_heads == heads
        assert len(restored[1].scorer_state) == (2 if heads == "own" else 3)  # pooled marks travel with their slots
        assert restored[1].scorer is restored[2].scorer  # one scorer for the restored layers, as for the live ones

        def continuation(c):
            follow_up = mx.array(np.random.default_rng(7).integers(0, VOCAB, 30), dtype=mx.int32)
            steps = generate_step(follow_up, model, prompt_cache=c, max_tokens=40, prefill_step_size=16)
            return [int(t) for t, _ in steps]

        assert continuation(restored) == continuation(live)
        assert restored[0].steps >= 2
    finally:
        namm_mlx.detach(model)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_marks_keep_a_token_in_every_head_of_its_layer(model, probe, pool):
    tokens, _ = _document(13, 160, 10)
    features = document_features(model, tokens, step=64)  # [L, H, T, D/2], full cache
    own = np.einsum("lhtp,lhp->lht", features, probe[:, :, :-1]) + probe[:, :, None, -1]
    # Layer 0's keys depend on the token alone, so the full cache's are the
    # ones the evicting cache sees; deeper layers' depend on what was evicted.
    pooled = own[0].mean(0) if pool == "mean" else own[0].max(0)  # [T]
    marked = set(np.flatnonzero(pooled >= 0).tolist()) - {len(tokens) - 1}
    # Tokens the pool marks but some head's own probe does not: what pooling changes.
    disputed = [t for t in marked if (own[0, :, t] < 0).any()]
    assert disputed and len(marked) < 48
    config = dataclasses.replace(CONFIG, key_probe_heads=pool)
    namm = NAMM(_namm().weights, mx.zeros(17), mx.ones(17), config, key_probe=mx.array(probe))
    cache, kept = _kept_after(model, namm, tokens, budget=48, chunk=32)
    assert cache[0].steps >= 4  # old slots' marks came from the carried state, not their keys
    for head in kept[0]:
        missing = marked - set(head.tolist())
        assert not missing, f"a head dropped pooled marks {sorted(missing)}"
    own_namm = NAMM(namm.weights, namm.norm_mean, namm.norm_var, CONFIG, key_probe=namm.key_probe)
    _, own_kept = _kept_after(model, own_namm, tokens, budget=48, chunk=32)
    assert any(marked - set(head.tolist()) for head in own_kept[0])  # each head on its own drops some


def test_layer_pooled_marks_are_the_mean_over_this_layer_and_the_ones_below(model, probe):
    tokens, _ = _document(14, 64, 6)
    features = document_features(model, tokens[:32], step=32)  # the first step's keys: nothing evicted yet
    own = (np.einsum("lhtp,lhp->lht", features, probe[:, :, :-1]) + probe[:, :, None, -1]).max(1)  # [L, T]
    config = dataclasses.replace(CONFIG, key_probe_heads="max", key_probe_layers="mean")
    namm = NAMM(_namm().weights, mx.zeros(17), mx.ones(17), config, key_probe=mx.array(probe))
    cache, _ = _kept_after(model, namm, tokens, budget=24, chunk=32)  # two forwards, two steps per layer
    for layer, c in enumerate(cache):
        carried = np.array(c.scorer_state[2])[0, 0]  # the pooled marks of the kept slots, every head alike
        first = np.array(c.kept_positions[0, 0]) < 32
        expected = own[: layer + 1].mean(0)[np.array(c.kept_positions[0, 0])[first]]
        np.testing.assert_allclose(carried[first], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(own[0], own[:3].mean(0))  # the layers' probes disagree, so the mean changes marks
    # a layer stepping alone (no layer below in this forward) keeps its own marks
    alone = NAMMScorer(namm, ranked=True)
    keys = mx.array(np.random.default_rng(2).normal(size=(1, 2, 32, 16)).astype(np.float32))
    context = dict(keys=keys, positions=mx.broadcast_to(mx.arange(32)[None, None], (1, 2, 32)), n_new=32, offset=32,
                   state=[], probabilities=mx.softmax(mx.random.normal((1, 2, 32, 32)), axis=-1), probabilities_dtype="bfloat16")  # fmt: skip
    alone.score(EvictionContext(**context, layer=0))
    lone = alone.score(EvictionContext(**{**context, "offset": 64}, layer=2)).state[2]
    mine = probe_scores(keys, mx.array(probe[2])).max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(lone), np.array(mx.broadcast_to(mine, lone.shape)), rtol=1e-5)
    with pytest.raises(ValueError, match="key_probe_layers 'mean' needs key_probe_heads 'mean' or 'max'"):
        NAMMConfig(key_probe_layers="mean")


def test_export_refuses_a_probed_namm(tmp_path, probe):
    folder = _namm(mx.array(probe)).save(tmp_path / "probed")
    with pytest.raises(ConversionError, match="key probe"):
        export_checkpoint(folder, tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_bad_probe_is_refused_in_one_line():
    from namm_mlx.namm import NAMMFormatError

    with pytest.raises(NAMMFormatError, match=r"key_probe must be \[layers, heads, D/2 \+ 1\]"):
        _namm(mx.zeros((3, 9)))
    with pytest.raises(NAMMFormatError, match="key_probe holds nan"):
        _namm(mx.full((1, 1, 3), float("nan")))


def test_attach_drops_a_probe_fitted_to_other_keys_with_a_warning(model, probe):
    other = np.zeros((3, 2, 5), np.float32)  # fitted for keys of dimension 8; this model's are 16
    with pytest.warns(UserWarning, match="fitted for 3 layers x 2 KV heads of dimension 8.*running without the probe"):
        namm_mlx.attach(model, _namm(mx.array(other)), max_kv_size=24)
    try:
        assert model.namm_scorer.namm.key_probe is None
        cache = make_prompt_cache(model)
        model(mx.array([_document(5, 64, 2)[0]]), cache=cache)
        assert all(c.steps >= 1 for c in cache)
    finally:
        namm_mlx.detach(model)
    namm_mlx.attach(model, _namm(mx.array(probe)), max_kv_size=24)  # the right shapes: kept
    try:
        assert model.namm_scorer.namm.key_probe is not None
    finally:
        namm_mlx.detach(model)


def test_replayed_caches_carry_the_recorded_layers_model_indices(model):
    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.policies import FullScorer
    from namm_mlx.recording import record_full_cache, recorded_layers, replay

    layers = recorded_layers(record_full_cache(model, _document(4, 64, 2)[0], 32))
    assert [c.layer for c in replay(layers, 0.25, lambda: EvictingKVCache(FullScorer()), step=32)] == [0, 1, 2]
    picked = replay([layers[2]], 0.25, lambda: EvictingKVCache(FullScorer()), step=32, layer_ids=[2])
    assert [c.layer for c in picked] == [2]
    with pytest.raises(ValueError, match="1 recorded layers but 2 layer ids"):
        replay([layers[2]], 0.25, lambda: EvictingKVCache(FullScorer()), step=32, layer_ids=[1, 2])


def test_a_budget_share_lifts_only_the_surest_marks(model, probe):
    marks = mx.array([[3.0, -1.0, 2.0, 1.0, 0.5]])
    scores = mx.array([[0.0, 9.0, 1.0, 2.0, 3.0]])
    lifted = np.array(protect_marked(scores, marks, 0.0, limit=2))[0]
    assert list(np.argsort(-lifted)[:2]) == [0, 2]  # the two surest marks, above every score
    assert (lifted[[1, 3, 4]] == [9.0, 2.0, 3.0]).all()  # the other marks keep their own score
    for roomy in (4, 9):  # as many places as marks, or more: every mark is lifted
        np.testing.assert_array_equal(np.array(protect_marked(scores, marks, 0.0, limit=roomy)),
                                      np.array(protect_marked(scores, marks, 0.0)))  # fmt: skip
    with pytest.raises(ValueError, match="key_probe_share must be a number above 0 and at most 1"):
        NAMMConfig(key_probe_share=0.0)

    class Watching(NAMMScorer):
        """The NAMM scorer, noting each step's budget and how many slots per head its probe lifted."""

        def score(self, context):
            result = super().score(context)
            plain = NAMMScorer(self.namm.without_key_probe(), ranked=True).score(context).scores
            lifted = (result.scores >= mx.max(plain, axis=-1, keepdims=True) + 1.0).sum(-1)
            marked = int(mx.sum(self._marks(context)[0] >= 0, -1).max().item())
            self.seen.append((context.budget, int(mx.max(lifted).item()), marked, context.keys.shape[2]))
            return result

    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.recording import record_full_cache, recorded_layers, replay

    tokens, _ = _document(12, 160, 10)
    layers = recorded_layers(record_full_cache(model, tokens, 32))
    shared = dataclasses.replace(CONFIG, key_probe_span=4, key_probe_share=0.25)
    namm = NAMM(_namm().weights, mx.zeros(17), mx.ones(17), shared, key_probe=mx.array(probe))
    scorer = Watching(namm, ranked=True)
    scorer.seen = []
    replay(layers, 1.0, lambda: EvictingKVCache(scorer, max_kv_size=40), step=32)
    assert {budget for budget, *_ in scorer.seen} == {32, 40}  # the cache tells the scorer its budget (32 slots at the first step)
    evicting = [(lifted, marked) for budget, lifted, marked, slots in scorer.seen if slots > budget]
    assert max(lifted for lifted, _ in evicting) == 10  # 0.25 x 40 slots, though more were marked
    assert max(marked for _, marked in evicting) > 10
    roomy = [(lifted, marked) for budget, lifted, marked, slots in scorer.seen if slots <= budget]
    assert roomy and all(lifted == marked for lifted, marked in roomy)  # a budget that evicts nothing limits nothing

    class Counting(Watching):
        """Also notes the kept count, and the count of the same NAMM without its probe."""

        def score(self, context):
            result = super().score(context)
            own = NAMMScorer(self.namm.without_key_probe()).score(context).keep
            self.counts.append((result.keep, own))
            return result

    strict = dataclasses.replace(shared, threshold=0.05)  # the BAM alone keeps about three quarters
    unbounded = Counting(NAMM(namm.weights, namm.norm_mean, namm.norm_var, strict, key_probe=namm.key_probe), ranked=False)
    unbounded.seen, unbounded.counts = [], []
    replay(layers, 1.0, lambda: EvictingKVCache(unbounded), step=32)
    assert {budget for budget, *_ in unbounded.seen} == {None}
    # At the threshold the BAM's own count is the unmarked part of the kept
    # slots, so the marks (share 0.25) add at most a third of it.
    room = lambda own: math.floor(own / 0.75 + 1e-9)  # noqa: E731
    assert all(own <= keep <= room(own) for keep, own in unbounded.counts)
    capped = [(lifted, marked, own) for (_, lifted, marked, slots), (_, own) in zip(unbounded.seen, unbounded.counts) if room(own) < slots]
    assert capped and all(lifted <= max(1, room(own) // 4) for lifted, _, own in capped)
    assert any(marked > max(1, room(own) // 4) for _, marked, own in capped)  # the cap bit


def test_a_document_share_gives_the_marks_a_floor_that_grows_with_the_text(model, probe):
    """Under a budget the marks get ``max(share x budget, min(document share x
    tokens read, budget // 2))`` slots: the floor follows the text, not the budget."""
    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.recording import record_full_cache, recorded_layers, replay

    class Watching(NAMMScorer):
        def score(self, context):
            result = super().score(context)
            plain = NAMMScorer(self.namm.without_key_probe(), ranked=True).score(context).scores
            lifted = int(mx.max((result.scores >= mx.max(plain, axis=-1, keepdims=True) + 1.0).sum(-1)).item())
            marked = int(mx.sum(self._marks(context)[0] >= 0, -1).min().item())
            if context.keys.shape[2] > context.budget:
                self.seen.append((context.offset, lifted, marked))
            return result

    tokens, _ = _document(12, 320, 80)
    layers = recorded_layers(record_full_cache(model, tokens, 32))
    limits = {}
    for document_share in (0.0, 0.1, 1.0):
        config = dataclasses.replace(CONFIG, key_probe_span=4, key_probe_share=0.25, key_probe_document_share=document_share)
        scorer = Watching(NAMM(_namm().weights, mx.zeros(17), mx.ones(17), config, key_probe=mx.array(probe)), ranked=True)
        scorer.seen = []
        replay(layers, 1.0, lambda: EvictingKVCache(scorer, max_kv_size=40), step=32)
        for offset, lifted, marked in scorer.seen:
            floor = min(math.floor(document_share * offset + 1e-9), 20)  # half of the 40 slots at most
            expected = max(10, floor)  # 0.25 x 40 slots
            assert marked >= expected, "the probe must mark more than the limit for the test to bite"
            assert lifted == expected, (document_share, offset)
        limits[document_share] = [lifted for _, lifted, _ in scorer.seen]
    assert set(limits[0.0]) == {10} and max(limits[0.1]) > 10 and set(limits[1.0]) == {20}
    with pytest.raises(ValueError, match="key_probe_document_share must be a number from 0 to 1"):
        NAMMConfig(key_probe_document_share=1.5)
