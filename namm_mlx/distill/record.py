"""Record what a NAMM sees and what it should have kept, from full-cache prefills.

For one item (document, question, reference answer) the whole text runs once
through full, query-recording caches. Each chosen layer is then replayed
through a keep-everything NAMM scorer, which computes the token features at
every eviction step exactly as the online pipeline does (attention
recomputation, STFT, carried EMA, ages); the same recording gives the
attention each token receives afterwards (:mod:`namm_mlx.eval.recall`).

Features are stored before normalisation (the EMA), so the normalisation
statistics can be fitted from the recording itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlx.core as mx
import numpy as np

from ..cache import EvictingKVCache, EvictionContext, Scores, evict_now
from ..config import NAMMConfig
from ..eval.likelihood import reference_answer
from ..eval.prompts import document_and_question, encode
from ..eval.recall import FutureAttention, future_attention_from_caches
from ..files import atomic_write
from ..namm import NAMM
from ..policies import NAMMScorer
from ..recording import record_full_cache, recorded_layers, replay


class FeatureRecorder(NAMMScorer):
    """A NAMM scorer that keeps every token and records each step's features.

    The features of a step do not depend on the NAMM's weights, only on the
    attention and the carried state, so an all-zero NAMM serves.
    """

    def __init__(self, config: NAMMConfig) -> None:
        # the key-norm input is computed whatever the config, so one recording
        # serves fits with and without it; the other features do not depend on it
        super().__init__(NAMM.zeros(dataclasses.replace(config, key_norm_input=True)))
        #: (offset, ema [H, N, n_bins], ages [H, N], key norm [H, N]) per step
        self.steps: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def score(self, context: EvictionContext) -> Scores:
        features = self.features(context)
        key_norm = features.key_norm[..., 0]
        mx.eval(features.ema, features.ages, features.attn_tail, key_norm)
        self.steps.append(
            (
                context.offset,
                np.array(features.ema[0]),
                np.array(features.ages[0]).astype(np.int32),
                np.array(key_norm[0]),
            )
        )
        return Scores(mx.zeros(context.positions.shape), [features.attn_tail, features.ema], None)


@dataclass
class StepRecord:
    """One layer's eviction step: inputs and targets for every cached token.

    ema: ``[H, N, n_bins]`` un-normalised spectrogram EMA; ages: ``[H, N]``;
    key_norm: ``[H, N]`` the key-norm input (None in recordings made before it).
    future: ``[H, N]`` mean attention per later query (rest of the document,
    question, answer). question / question_max: ``[H, N]`` mean / largest
    attention from the question and answer queries only.
    """

    layer: int
    offset: int
    ema: np.ndarray
    ages: np.ndarray
    future: np.ndarray
    question: np.ndarray
    question_max: np.ndarray
    key_norm: np.ndarray | None = None


@dataclass
class ItemRecord:
    """Every recorded step of one item."""

    item_id: str
    doc_length: int
    length: int
    steps: list[StepRecord]

    @property
    def has_key_norm(self) -> bool:
        """Whether every step holds the key-norm input (recordings made before
        it was recorded do not)."""
        return all(s.key_norm is not None for s in self.steps)

    def save(self, path: str | Path) -> None:
        """One ``.npz`` (written to a temp name, then renamed)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for i, s in enumerate(self.steps):
            for name in ("ema", "ages", "future", "question", "question_max", "key_norm"):
                if getattr(s, name) is not None:
                    arrays[f"{i}.{name}"] = getattr(s, name)
        meta = {
            "item_id": self.item_id,
            "doc_length": self.doc_length,
            "length": self.length,
            "steps": [[s.layer, s.offset] for s in self.steps],
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "ItemRecord":
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            steps = [
                StepRecord(
                    layer,
                    offset,
                    *(data[f"{i}.{n}"] for n in ("ema", "ages", "future", "question", "question_max")),
                    data[f"{i}.key_norm"] if f"{i}.key_norm" in data else None,
                )
                for i, (layer, offset) in enumerate(meta["steps"])
            ]
        return cls(meta["item_id"], meta["doc_length"], meta["length"], steps)


def item_tokens(tokenizer: Any, item: Mapping[str, Any], granularity: int = 16) -> tuple[list[int], list[int]]:
    """``(tokens, doc_length)``: document, question and reference answer, with
    the document first as ``namm chat`` reads it."""
    document, question = document_and_question(tokenizer, item, granularity)
    answer = encode(tokenizer, reference_answer(item))
    return document + question + answer, len(document)


def record_item(
    model: Any,
    tokenizer: Any,
    item: Mapping[str, Any],
    config: NAMMConfig | None = None,
    layers: Sequence[int] | None = None,
) -> ItemRecord:
    """Features and future-attention targets of ``item`` at every step of the
    chosen ``layers`` (all when None) while its document is read."""
    config = config or NAMMConfig()
    tokens, doc_length = item_tokens(tokenizer, item, config.hop)
    caches = record_full_cache(model, tokens, config.update_interval, split=doc_length)
    recorded = recorded_layers(caches)
    chosen = list(range(len(caches))) if layers is None else [l for l in layers if 0 <= l < len(caches)]
    features = {}
    for layer in chosen:
        recorder = FeatureRecorder(config)
        replayed = replay(
            [recorded[layer]], caches[0].scale, lambda: EvictingKVCache(recorder),
            upto=doc_length, step=config.update_interval, layer_ids=[layer],
        )  # fmt: skip
        evict_now(replayed)  # the step at the document's end, before the question
        features[layer] = recorder.steps
        del replayed
    future = future_attention_from_caches(caches, doc_length, config.update_interval, chosen)
    del caches, recorded
    return ItemRecord(str(item.get("_id", "")), doc_length, len(tokens), steps_from(features, future, chosen))


def steps_from(
    features: Mapping[int, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]], future: FutureAttention, layers: Sequence[int]
) -> list[StepRecord]:
    """Pair each recorded step's features with its targets (``future``'s layer
    ``i`` is model layer ``layers[i]``)."""
    steps = []
    n_question = future.length - future.doc_length
    for index, layer in enumerate(layers):
        for offset, ema, ages, key_norm in features[layer]:
            n_future = future.length - offset
            steps.append(
                StepRecord(
                    layer,
                    offset,
                    ema,
                    ages,
                    (future.future(index, offset) / n_future).astype(np.float32),
                    (future.question(index, offset) / n_question).astype(np.float32),
                    future.question(index, offset, reduce="max").astype(np.float32),
                    key_norm,
                )
            )
    return steps
