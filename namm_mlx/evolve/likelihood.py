"""Likelihood fitness: how well a NAMM-evicted cache still predicts the answers.

For each member, a NAMM is built from its vector, attached to the language
model, and the log-probability of reference answers to long-context items
(passkeys, needles, ...) is measured under its evicted cache. Fitness is the
mean over items of ``exp(mean_logp_evicted - mean_logp_full)`` (per-token
probability relative to the full cache: 1.0 = as good as full), minus
``memory_penalty`` times the member's mean kept fraction, so evolution trades
quality for memory at a rate the user picks. No generation: one teacher-forced
pass per item, cheap enough for a CPU. Pools, calibration and options are
shared with the generation fitness (:mod:`.harness`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from ..cache import EvictingKVCache
from ..eval.likelihood import answer_logprob, full_cache_factory
from ..eval.prompts import prompt_tokens
from ..integration import attach, detach
from .harness import DEFAULTS, CalibratingScorer, HarnessFitness, build_harness_fitness

__all__ = ["DEFAULTS", "CalibratingScorer", "LikelihoodFitness", "likelihood_fitness"]


class LikelihoodFitness(HarnessFitness):
    """Callable fitness (see :mod:`namm_mlx.evolve.fitness` for the contract)."""

    def __init__(self, model: Any, tokenizer: Any, items: list[dict], calibration: list[dict], options: dict) -> None:
        super().__init__(model, tokenizer, items, calibration, options)
        self._full_factory = full_cache_factory(model)
        self._full: dict[str, Any] = {}

    def run_item(self, item: Mapping[str, Any], cache_factory: Any = None) -> Any:
        return answer_logprob(self.model, self.tokenizer, item, cache_factory or self.model.make_cache)

    def full_logprob(self, item: Mapping[str, Any]) -> Any:
        key = item["_id"]
        if key not in self._full:
            self._full[key] = self.run_item(item, self._full_factory)
        return self._full[key]

    def evaluate(self, vector: np.ndarray, items: list[dict]) -> dict[str, float]:
        """Relative answer likelihood and kept fraction of one parameter vector."""
        scorer = self.scorer_for(vector)
        caches: list[list[Any]] = []

        def make_cache() -> list[Any]:
            caches.append(self.model.make_cache())
            return caches[-1]

        ratios, kept = [], []
        try:
            for item in items:
                size = self.max_kv_size(len(prompt_tokens(self.tokenizer, item)[0]))
                attach(self.model, scorer, max_kv_size=size, probe=False)
                evicted = self.run_item(item, make_cache)
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
    return build_harness_fitness(LikelihoodFitness, "likelihood", n, model, options)
