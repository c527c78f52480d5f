"""Future-attention recall: the hand-computed case, the recording, and policies on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from namm_mlx.attention import attention_probabilities
from namm_mlx.eval.recall import (
    FutureAttention,
    KeptSnapshot,
    block_edges,
    future_attention_recall,
    kept_share,
    prefill_with_trace,
    record_future_attention,
)
from namm_mlx.integration import attach, detach
from namm_mlx.recording import record_full_cache
from namm_mlx.policies import make_scorer
from tiny_models import tiny_model


def test_kept_share_hand_computed():
    # head 0 attends 0.5, 0.3, 0.2 to tokens 0..2; keeping {0, 2} keeps 0.7 of it.
    # head 1 attends 0.1, 0.1, 0.8; keeping {1, 2} keeps 0.9.
    attention = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    kept = np.array([[0, 2], [1, 2]])
    assert kept_share(attention, kept) == pytest.approx((0.7 + 0.9) / 2)


def test_recall_of_a_hand_made_recording():
    # One layer, one head, 4 tokens, blocks of 2 queries; document = 4 tokens... then 2 question tokens.
    # Queries 2,3 attend to tokens 0,1 with sums [0.6, 0.4] (plus themselves); queries 4,5 put [0.1, 0.9].
    T, step, doc = 6, 2, 4
    sums = np.zeros((1, 3, T), np.float32)
    sums[0, 1, :2] = [0.6, 0.4]
    sums[0, 2, :2] = [0.1, 0.9]
    sums[0, 1, 2:4] = [1.0, 1.0]  # the block's own tokens
    sums[0, 2, 2:6] = [0.2, 0.3, 0.5, 0.5]
    future = FutureAttention([sums], [sums], step, T, doc)
    # A step at offset 2 that kept token 0 only: future attention on {0,1} is [0.7, 1.3].
    result = future_attention_recall(future, [KeptSnapshot(2, [np.array([[0]])])])
    assert result.mean == pytest.approx(0.7 / 2.0)
    # question-only recall: [0.1, 0.9] -> keeping token 0 keeps 0.1
    assert result.question_final == pytest.approx(0.1)
    # keeping both keeps everything
    assert future_attention_recall(future, [KeptSnapshot(2, [np.array([[0, 1]])])]).mean == pytest.approx(1.0)


def test_block_edges_split_at_the_document_end():
    assert block_edges(1300, 1000, 512) == [0, 512, 1000, 1024, 1300]
    assert block_edges(1024, 1024, 512) == [0, 512, 1024]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


def test_recorded_block_sums_equal_direct_attention(model):
    tokens = np.random.default_rng(0).integers(1, 90, size=300).tolist()
    future = record_future_attention(model, tokens, doc_length=200, step=128)
    caches = record_full_cache(model, tokens, step=128)
    layer = 1
    c = caches[layer]
    probs = np.array(attention_probabilities(c.queries[:, :, :300], c.keys[:, :, :300], c.scale)[0])  # [H, T, T]
    # queries >= 128 on tokens < 128
    np.testing.assert_allclose(future.future(layer, 128), probs[:, 128:, :128].sum(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(future.question(layer, 200), probs[:, 200:, :200].sum(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        future.question(layer, 200, reduce="max"), probs[:, 200:, :200].max(axis=1), rtol=1e-4, atol=1e-6
    )


def test_full_cache_recall_is_one_and_random_is_lower(model):
    tokens = np.random.default_rng(1).integers(1, 90, size=640).tolist()
    future = record_future_attention(model, tokens, doc_length=576, step=128)
    recalls = {}
    for name in ("full", "random"):
        attach(model, make_scorer(name, interval=128) if name != "full" else make_scorer("full"), max_kv_size=64, probe=False)
        try:
            caches = model.make_cache()
            trace = prefill_with_trace(model, caches, tokens[:512], step=128)
        finally:
            detach(model)
        if name == "full":
            # a full cache never steps: take the one snapshot by hand
            from namm_mlx.eval.recall import KeptSnapshot as Snap

            trace = [Snap(512, [np.broadcast_to(np.arange(512), (2, 512)) for _ in caches])]
        assert trace, name
        recalls[name] = future_attention_recall(future, trace).mean
    assert recalls["full"] == pytest.approx(1.0)
    assert 0.0 < recalls["random"] < 1.0
    # the oracle keeps each head's 64 tokens with the most future attention: nothing beats it
    last = trace[-1]
    oracle = [np.sort(np.argsort(-future.future(l, 512), axis=-1)[:, :64], axis=-1) for l in range(len(last.kept))]
    best = future_attention_recall(future, [KeptSnapshot(512, oracle)]).mean
    assert best > future_attention_recall(future, [last]).mean


def test_a_saved_recording_replays_as_the_recorded_one(model, tmp_path):
    from namm_mlx.eval.query_agnostic import replay_kept_sets
    from namm_mlx.eval.recall import future_attention_from_caches, load_recording, save_recording
    from namm_mlx.cache import EvictingKVCache
    from namm_mlx.recording import recorded_layers

    tokens = np.random.default_rng(2).integers(1, 90, size=400).tolist()
    caches = record_full_cache(model, tokens, step=128, split=320)
    layers, scale = recorded_layers(caches), caches[0].scale
    future = future_attention_from_caches(caches, 320, 128)
    path = save_recording(tmp_path / "deep" / "item.npz", layers, scale, future)
    loaded, loaded_scale, loaded_future = load_recording(path)
    assert loaded_scale == scale and len(loaded) == len(layers)
    assert (loaded_future.step, loaded_future.length, loaded_future.doc_length) == (128, 400, 320)
    for (k, v, q), (k2, v2, q2) in zip(layers, loaded):
        for a, b in ((k, k2), (v, v2), (q, q2)):
            assert a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b))
    recalls = []
    for recording, fut in ((layers, future), (loaded, loaded_future)):
        make = lambda: EvictingKVCache(make_scorer("h2o", interval=128), max_kv_size=96)
        trace, _ = replay_kept_sets(recording, scale, make, 320)
        recalls.append(future_attention_recall(fut, trace).mean)
    assert 0.0 < recalls[0] < 1.0 and recalls[0] == recalls[1]
