"""Replay fitness: the likelihood fitness at a fraction of its cost on a CPU.

The likelihood fitness runs every member's prefill through the language model
(a 1,024-token prompt is ~10 s of CPU per member and item). Here each item's
prompt is run once with the full cache while every layer's post-RoPE queries,
keys and values are recorded; a member then *replays* the recording through
real :class:`EvictingKVCache` layers with its NAMM (the same cadence, attention
recomputation, features, scoring and selection as online: only the model's
forward is skipped), and the answer is teacher-forced through the model from
the evicted caches. Per member and item that is the NAMM steps plus a forward of
the answer's few tokens.

The approximation: after the first eviction, the real online run computes
later tokens' hidden states (and so their queries and keys) with the evicted
cache; the replay uses the full-cache ones, as a one-shot compression (kvpress)
does. Evolve with it, then check the result with ``namm eval``, which runs the
NAMM online. Fitness, kept fraction and options are those of the likelihood
fitness (the full-cache reference goes through the same replay path, without
eviction).

Query-agnostic by default (option ``protocol=agnostic``), as ``namm eval`` and
``namm chat`` are: the recording holds the document part of the prompt only
(:func:`namm_mlx.eval.query_agnostic.split_prompt`), the member's caches run a
last step at the document's end, and the question is teacher-forced with the
answer, so no eviction step ever sees the question. ``protocol=aware`` records
the whole prompt (question included), as the online likelihood fitness runs it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from ..cache import EvictingKVCache
from ..eval.likelihood import LogProb, reference_answer, target_logprob
from ..eval.prompts import encode, prompt_tokens
from ..eval.query_agnostic import replay_kept_sets, split_prompt
from ..hook import install_hook
from ..policies import FullScorer
from ..recording import record_full_cache, recorded_layers, replay
from .harness import build_harness_fitness
from .likelihood import LikelihoodFitness
from .options import FitnessError

__all__ = ["Recording", "ReplayFitness", "replay_fitness", "replay_caches"]


@dataclass
class Recording:
    """One item's prompt (all but its last token) run through the full cache.

    layers: per layer ``(keys, values, queries)`` of every recorded token,
    ``[1, H, N, D]`` / ``[1, Hq, N, D]``. tail: the last prompt token and the
    answer but its last token (what is teacher-forced after the prompt).
    target: the answer tokens scored (the last ``len(target)`` of the tail's
    predictions). document_length: set when only the document part was recorded
    (query-agnostic); the tail then starts with the question part.
    """

    layers: list[tuple[mx.array, mx.array, mx.array]]
    scale: float
    tail: list[int]
    target: list[int]
    document_length: int | None = None

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]


def record(model: Any, tokenizer: Any, item: Mapping[str, Any], step: int = 512, agnostic: bool = False) -> Recording:
    """Prefill ``item``'s prompt (``agnostic``: its document part) with a full,
    query-recording cache."""
    target = encode(tokenizer, reference_answer(item))
    if not target:
        raise FitnessError(f"item {item.get('_id', '?')}: the answer encodes to no tokens")
    if agnostic:
        split = split_prompt(tokenizer, item)
        recorded, tail = split.document, [*split.question, *target[:-1]]
    else:
        prompt, _ = prompt_tokens(tokenizer, item)
        recorded, tail = prompt[:-1], [prompt[-1], *target[:-1]]
    try:
        caches = record_full_cache(model, recorded, step)
    except ValueError as err:
        raise FitnessError(f"{err}; use --fitness likelihood") from None
    return Recording(recorded_layers(caches), caches[0].scale, tail, target, len(recorded) if agnostic else None)


def replay_caches(
    recording: Recording, scorer: Any, step: int = 512, max_kv_size: int | None = None
) -> list[EvictingKVCache]:
    """Fresh caches under ``scorer`` (and budget) fed the recording (see
    :func:`namm_mlx.recording.replay`); a document recording ends with the
    step at the document's end (:func:`namm_mlx.eval.query_agnostic.replay_kept_sets`)."""
    make = lambda: EvictingKVCache(scorer, max_kv_size=max_kv_size)  # noqa: E731
    if recording.document_length is not None:
        return replay_kept_sets(recording.layers, recording.scale, make, recording.document_length, step)[1]
    return replay(recording.layers, recording.scale, make, step=step)


def answer_logprob_replayed(model: Any, recording: Recording, caches: list[Any]) -> LogProb:
    """Log-probability of the recorded answer, teacher-forced from ``caches``."""
    install_hook()  # the caches' attend() must see the forward
    logits = model(mx.array([recording.tail]), cache=caches)[0, -len(recording.target) :].astype(mx.float32)
    return target_logprob(logits, recording.target)


class ReplayFitness(LikelihoodFitness):
    """Callable fitness (see :mod:`namm_mlx.evolve.fitness` for the contract).

    Calibration runs online, as the likelihood fitness's does; recordings are
    kept for the items of the last generations (an LRU of two generations' worth).
    """

    def __init__(self, model: Any, tokenizer: Any, items: list[dict], calibration: list[dict], options: dict) -> None:
        super().__init__(model, tokenizer, items, calibration, options)
        self._recordings: OrderedDict[str, Recording] = OrderedDict()
        protocol = options.get("extra", {}).get("protocol", "agnostic")
        if protocol not in ("agnostic", "aware"):
            raise FitnessError(f"protocol must be 'agnostic' or 'aware', got {protocol!r}")
        self.agnostic = protocol == "agnostic"

    def recording(self, item: Mapping[str, Any]) -> Recording:
        key = item["_id"]
        if key in self._recordings:
            self._recordings.move_to_end(key)
        else:
            self._recordings[key] = record(self.model, self.tokenizer, item, agnostic=self.agnostic)
            while len(self._recordings) > 2 * max(1, self.per_generation):
                self._recordings.popitem(last=False)
        return self._recordings[key]

    def full_logprob(self, item: Mapping[str, Any]) -> Any:
        key = item["_id"]
        if key not in self._full:
            rec = self.recording(item)
            self._full[key] = answer_logprob_replayed(self.model, rec, replay_caches(rec, FullScorer()))
        return self._full[key]

    def evaluate(self, vector: np.ndarray, items: list[dict]) -> dict[str, float]:
        """Relative answer likelihood and kept fraction of one parameter vector, replayed."""
        scorer = self.scorer_for(vector)
        ratios, kept = [], []
        for item in items:
            rec = self.recording(item)
            caches = replay_caches(rec, scorer, max_kv_size=self.max_kv_size(rec.length))
            evicted = answer_logprob_replayed(self.model, rec, caches)
            ratios.append(math.exp(min(evicted.mean - self.full_logprob(item).mean, 50.0)))
            kept.append(float(np.mean([c.length / c.offset for c in caches])))  # of the document when agnostic
        quality, kept_fraction = float(np.mean(ratios)), float(np.mean(kept))
        return {
            "fitness": quality - self.memory_penalty * kept_fraction,
            "quality": quality,
            "kept_fraction": kept_fraction,
        }


def replay_fitness(n: int = 4172, model: str | None = None, options: Mapping[str, str] | None = None) -> ReplayFitness:
    """Factory for ``namm evolve --fitness replay`` (options: the likelihood fitness's)."""
    return build_harness_fitness(ReplayFitness, "replay", n, model, options, extra={"protocol": "agnostic"})
