"""Distillation: recorded features equal the online pipeline's, and a fit learns a planted rule."""

from __future__ import annotations

import numpy as np
import pytest

from namm_mlx.cache import evict_now
from namm_mlx.config import NAMMConfig
from namm_mlx.distill import DistillOptions, ItemRecord, fit_namm
from namm_mlx.distill.record import FeatureRecorder, record_item
from namm_mlx.eval.recall import record_future_attention
from namm_mlx.bam import bam_scores
from namm_mlx.features import RecencyTable, normalize_spectrum
from namm_mlx.integration import attach, detach
from namm_mlx.prefill import prefill
import mlx.core as mx
from tiny_models import VOCAB, tiny_model

CONFIG = NAMMConfig(update_interval=128)


class WordTokenizer:
    """Enough of a tokenizer for the document/question split: a chat template
    that wraps the user message, and one token per character."""

    chat_template = "tiny"
    bos_token_id = None

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "<u>" + messages[-1]["content"] + "</u><a>"

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) % (VOCAB - 1)) for c in text]


def _item(seed: int, length: int = 600) -> dict:
    rng = np.random.default_rng(seed)
    words = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=int(rng.integers(2, 8)))) for _ in range(length // 4)]
    return {"_id": f"tiny-{seed}", "context": " ".join(words)[:length], "input": "which word?", "answers": ["abc"]}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


def test_recorded_features_equal_the_online_pipeline(model):
    tokenizer, item = WordTokenizer(), _item(0)
    record = record_item(model, tokenizer, item, CONFIG)
    from namm_mlx.distill.record import item_tokens

    tokens, doc_length = item_tokens(tokenizer, item)
    online = FeatureRecorder(CONFIG)
    attach(model, online, probe=False)
    try:
        caches = model.make_cache()
        prefill(model, caches, tokens[:doc_length], CONFIG.update_interval)
        evict_now(caches)
    finally:
        detach(model)
    layers = len(caches)
    assert len(online.steps) == len(record.steps) and len(record.steps) % layers == 0
    by_layer = {}
    for s in record.steps:
        by_layer.setdefault(s.layer, []).append(s)
    for k, (offset, ema, ages, key_norm) in enumerate(online.steps):
        recorded = by_layer[k % layers][k // layers]
        assert recorded.offset == offset
        np.testing.assert_array_equal(recorded.ema, ema)
        np.testing.assert_array_equal(recorded.ages, ages)
        np.testing.assert_array_equal(recorded.key_norm, key_norm)
    # the last step is the document's end
    assert record.steps[-1].offset == doc_length


def test_record_round_trips_through_a_file(model, tmp_path):
    record = record_item(model, WordTokenizer(), _item(1), CONFIG, layers=[0, 2])
    record.save(tmp_path / "r.npz")
    again = ItemRecord.load(tmp_path / "r.npz")
    assert [(s.layer, s.offset) for s in again.steps] == [(s.layer, s.offset) for s in record.steps]
    for a, b in zip(again.steps, record.steps):
        np.testing.assert_array_equal(a.ema, b.ema)
        np.testing.assert_array_equal(a.question_max, b.question_max)


def _planted(model, seed: int) -> tuple[ItemRecord, list]:
    """A record whose target is a planted rule: the attention a token got from
    the last block of queries before the step (recent attention), which a
    cumulative-attention rule like H2O cannot rank by. Returns the record and,
    per step, H2O's cumulative attention."""
    tokenizer, item = WordTokenizer(), _item(seed, 900)
    record = record_item(model, tokenizer, item, CONFIG)
    from namm_mlx.distill.record import item_tokens

    tokens, doc_length = item_tokens(tokenizer, item)
    future = record_future_attention(model, tokens, doc_length, CONFIG.update_interval)
    cumulative = []
    for s in record.steps:
        block = future.edges.index(s.offset)
        sums = future.block_sums[s.layer][:, :block, : s.offset]
        s.future = sums[:, -1] / 128.0  # attention from the last block
        s.question = s.future
        cumulative.append(sums.sum(axis=1))
    return record, cumulative


def _kept_share(importance: np.ndarray, ranking: np.ndarray, fraction: float) -> float:
    k = max(1, int(fraction * importance.shape[-1]))
    top = np.argsort(-ranking, axis=-1)[:, :k]
    return float((np.take_along_axis(importance, top, axis=-1).sum(-1) / importance.sum(-1)).mean())


def test_distillation_learns_a_planted_rule(model):
    train = [_planted(model, seed)[0] for seed in (10, 11, 12)]
    held_out, h2o = _planted(model, 20)
    # Adam leaves the plateau that H2O's ranking sits on somewhere between 60 and
    # 100 steps, at a step that moves with the BLAS's summation order (60 steps
    # beat H2O with two OpenBLAS threads and lost with one); by 150 it is past it
    # either way, 0.08 above H2O.
    options = DistillOptions(target="future", steps=150, learning_rate=1e-2, seed=0, keep=0.5, layers_per_batch=None, window=256)
    namm = fit_namm(train, options, CONFIG)
    recency = RecencyTable(CONFIG)
    rng = np.random.default_rng(0)
    shares = {"namm": [], "h2o": [], "random": []}
    for s, cumulative in zip(held_out.steps, h2o):
        normalized = normalize_spectrum(mx.array(s.ema), namm.norm_mean, namm.norm_var, CONFIG.norm_eps)
        embedding = mx.concatenate([recency(mx.array(s.ages)), normalized], axis=-1)
        scores = np.array(bam_scores(embedding, namm.weights, CONFIG).scores)
        shares["namm"].append(_kept_share(s.future, scores, 0.25))
        shares["h2o"].append(_kept_share(s.future, cumulative, 0.25))
        shares["random"].append(_kept_share(s.future, rng.random(s.future.shape), 0.25))
    mean = {k: float(np.mean(v)) for k, v in shares.items()}
    assert mean["namm"] > mean["random"] + 0.05, mean
    assert mean["namm"] >= mean["h2o"], mean
    # the calibrated threshold keeps about the requested share of the training tokens
    assert namm.metadata["method"] == "distilled"


def test_a_fit_without_recency_never_reads_a_tokens_age(model):
    record = _planted(model, 10)[0]
    options = DistillOptions(target="future", steps=5, learning_rate=1e-2, seed=0, layers_per_batch=None, window=256, recency=False)
    namm = fit_namm([record], options, CONFIG)
    assert namm.metadata["distill_options"].count('"recency": false') == 1
    assert not np.any(np.array(namm.weights.qkv_weight)[: CONFIG.recency_dim])
    assert np.any(np.array(namm.weights.qkv_weight)[CONFIG.recency_dim :])  # the spectrum's rows did learn
    step = record.steps[-1]
    recency = RecencyTable(CONFIG)
    normalized = normalize_spectrum(mx.array(step.ema), namm.norm_mean, namm.norm_var, CONFIG.norm_eps)

    def scores(ages: np.ndarray) -> np.ndarray:
        embedding = mx.concatenate([recency(mx.array(ages)), normalized], axis=-1)
        return np.array(bam_scores(embedding, namm.weights, CONFIG).scores)

    np.testing.assert_array_equal(scores(step.ages), scores(step.ages[..., ::-1].copy()))
