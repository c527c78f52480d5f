"""Likelihood fitness: how well a NAMM-evicted cache still predicts the answers.

For each member, a NAMM is built from its vector, attached to the language
model, and the log-probability of reference answers to long-context items
(passkeys, needles, ...) is measured under its evicted cache. Fitness is the
mean over items of ``exp(mean_logp_evicted - mean_logp_full)`` (per-token
probability relative to the full cache: 1.0 = as good as full), minus
``memory_penalty`` times the member's mean kept fraction, so evolution trades
quality for memory at a rate the user picks. No generation: one teacher-forced
pass per item, cheap enough for a CPU.

The frozen normalisation statistics are calibrated as the reference does at
its first evaluation: a NAMM with all-zero parameters (which evicts nothing)
runs over calibration items and the pooled mean/variance of the 17 EMA bins of
every call, layer, head and token is kept.
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from ..cache import EvictingKVCache, EvictionContext, Scores
from ..config import NAMMConfig
from ..integration import attach, detach
from ..namm import NAMM
from ..policies import NAMMScorer
from .fitness import FitnessError, _float_option, _int_option

DEFAULTS = {
    "tasks": "passkey,needle",
    "length": "1024",
    "pool": "24",
    "items": "4",
    "memory_penalty": "0.25",
    "calibration_items": "4",
    "data_seed": "1234",
}


class CalibratingScorer(NAMMScorer):
    """A NAMM scorer that also pools the statistics of the EMA spectrogram."""

    def __init__(self, namm: NAMM) -> None:
        super().__init__(namm)
        self.count = 0
        self.mean = np.zeros(namm.config.n_bins)
        self.m2 = np.zeros(namm.config.n_bins)

    def score(self, context: EvictionContext) -> Scores:
        scores = super().score(context)
        ema = np.asarray(scores.state[1], dtype=np.float64).reshape(-1, self.namm.config.n_bins)
        n, mean = ema.shape[0], ema.mean(axis=0)
        m2 = ((ema - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta**2 * self.count * n / total  # pooled (Chan et al.) update
        self.mean += delta * n / total
        self.count = total
        return scores

    def statistics(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, population variance, count) per bin."""
        var = self.m2 / max(self.count, 1)
        return self.mean.astype(np.float32), var.astype(np.float32), np.full(len(self.mean), self.count, np.int64)


class LikelihoodFitness:
    """Callable fitness (see :mod:`namm_mlx.evolve.fitness` for the contract)."""

    def __init__(self, model: Any, tokenizer: Any, items: list[dict], calibration: list[dict], options: dict) -> None:
        from ..eval.likelihood import answer_logprob, full_cache_factory

        self.model, self.tokenizer = model, tokenizer
        self.pool, self.calibration = items, calibration
        self.per_generation = options["items"]
        self.memory_penalty = options["memory_penalty"]
        self.data_seed = options["data_seed"]
        self.config = NAMMConfig()
        self._answer_logprob = answer_logprob
        self._full_factory = full_cache_factory(model)
        self._full: dict[str, Any] = {}
        self.norm: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def calibrate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalisation statistics from an all-zero NAMM over the calibration items."""
        scorer = CalibratingScorer(NAMM.zeros(self.config))
        attach(self.model, scorer, probe=False)
        try:
            for item in self.calibration:
                self._answer_logprob(self.model, self.tokenizer, item, self.model.make_cache)
        finally:
            detach(self.model)
        if scorer.count == 0:
            raise FitnessError("calibration ran no NAMM step: use items of at least 512 tokens")
        self.norm = scorer.statistics()
        return self.norm

    def items_for(self, generation: int) -> list[dict]:
        """The items of a generation: the same for every member (and every rank)."""
        rng = random.Random(f"{self.data_seed}-{generation}")
        return rng.sample(self.pool, min(self.per_generation, len(self.pool)))

    def full_logprob(self, item: Mapping[str, Any]) -> Any:
        key = item["_id"]
        if key not in self._full:
            self._full[key] = self._answer_logprob(self.model, self.tokenizer, item, self._full_factory)
        return self._full[key]

    def evaluate(self, vector: np.ndarray, items: list[dict]) -> dict[str, float]:
        """Relative answer likelihood and kept fraction of one parameter vector."""
        if self.norm is None:
            self.calibrate()
        mean, var, count = self.norm
        namm = NAMM.from_flat(vector, mean, var, self.config, count)
        caches: list[list[Any]] = []

        def make_cache() -> list[Any]:
            caches.append(self.model.make_cache())
            return caches[-1]

        attach(self.model, namm, probe=False)
        ratios, kept = [], []
        try:
            for item in items:
                evicted = self._answer_logprob(self.model, self.tokenizer, item, make_cache)
                ratios.append(math.exp(min(evicted.mean - self.full_logprob(item).mean, 50.0)))
                layers = [c for c in caches[-1] if isinstance(c, EvictingKVCache)]
                kept.append(float(np.mean([c.length / c.offset for c in layers])))
        finally:
            detach(self.model)
        quality, kept_fraction = float(np.mean(ratios)), float(np.mean(kept))
        return {
            "fitness": quality - self.memory_penalty * kept_fraction,
            "quality": quality,
            "kept_fraction": kept_fraction,
        }

    def __call__(self, members: np.ndarray, member_ids: list[int], *, context: Any = None) -> list[dict]:
        items = self.items_for(context.generation if context is not None else 0)
        return [self.evaluate(row, items) for row in np.asarray(members, dtype=np.float64)]


def likelihood_fitness(
    n: int = 4172, model: str | None = None, options: Mapping[str, str] | None = None
) -> LikelihoodFitness:
    """Factory for ``namm evolve --fitness likelihood``.

    Options (``--fitness-arg KEY=VALUE``): ``tasks`` (comma list, default
    passkey,needle), ``length`` (prompt tokens, default 1024), ``pool`` (items
    generated once, default 24), ``items`` (sampled per generation, default 4),
    ``memory_penalty`` (default 0.25), ``calibration_items`` (default 4),
    ``data_seed``, ``text`` (comma list of text files; default: the texts of
    ``namm data fetch``).
    """
    from ..eval.tasks import TASK_NAMES, TextSource, make_items
    from ..models import load_model

    opts = {**DEFAULTS, **dict(options or {})}
    known = set(DEFAULTS) | {"text"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise FitnessError(f"unknown option(s) for fitness 'likelihood': {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    tasks = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASK_NAMES]
    if bad:
        raise FitnessError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(TASK_NAMES)}")
    parsed = {
        "length": _int_option(opts, "length", 1024),
        "pool": _int_option(opts, "pool", 24),
        "items": _int_option(opts, "items", 4),
        "calibration_items": _int_option(opts, "calibration_items", 4),
        "data_seed": _int_option(opts, "data_seed", 1234),
        "memory_penalty": _float_option(opts, "memory_penalty", 0.25, positive=False),
    }
    if n != NAMMConfig().param_size:
        raise FitnessError(f"fitness 'likelihood' evolves a NAMM of {NAMMConfig().param_size:,} parameters, not {n:,}")
    loaded, tokenizer = load_model(model)
    if opts.get("text"):
        source = TextSource.from_files(p.strip() for p in opts["text"].split(","))
    else:
        source = TextSource.from_cache(kjv="kjv_verse" in tasks)
    per_task = max(1, -(-parsed["pool"] // len(tasks)))
    pool = make_items(tasks, [parsed["length"]], per_task, parsed["data_seed"], source, tokenizer)
    calibration = make_items(
        tasks, [parsed["length"]], max(1, -(-parsed["calibration_items"] // len(tasks))),
        parsed["data_seed"] + 1, source, tokenizer,
    )  # fmt: skip
    return LikelihoodFitness(loaded, tokenizer, pool, calibration, parsed)
