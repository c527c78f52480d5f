"""Generation fitness: task scores of greedy answers under the evicted cache.

The reference's objective (spec §7.2): each member answers the generation's
items with its NAMM attached (greedy decoding through stock
``mlx_lm.stream_generate``, as ``namm eval`` does), each answer is scored with
the task's metric, and a task's mean score is divided by the full cache's mean
score on the same items (computed once per item and cached). Fitness is the
mean of those ratios over tasks, minus ``memory_penalty`` times the member's
mean kept fraction. Tasks the full cache scores 0 on are left out of the mean
(there is nothing to preserve); if every task is, the member gets the mean
raw score instead, so evolution still has a signal.

Slower than the likelihood fitness (a prefill plus up to the task's answer
length in decode steps per item), but it measures what users see.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..eval.metrics import score_prediction
from ..eval.item import generate_answer, prepare_prompt
from ..integration import attach, detach
from .harness import HarnessFitness, build_harness_fitness

__all__ = ["GenerationFitness", "generation_fitness"]


class GenerationFitness(HarnessFitness):
    """Callable fitness (see :mod:`namm_mlx.evolve.fitness` for the contract)."""

    def __init__(self, model: Any, tokenizer: Any, items: list[dict], calibration: list[dict], options: dict) -> None:
        super().__init__(model, tokenizer, items, calibration, options)
        max_tokens = options["extra"].get("max_tokens")
        self.max_tokens = int(max_tokens) if max_tokens else None
        self._full: dict[str, float] = {}

    def run_item(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """Answer ``item`` with the model as attached (or not); its score and kept fraction."""
        prompt, _, limit = prepare_prompt(self.tokenizer, item, None, self.max_tokens, None)
        out = generate_answer(self.model, self.tokenizer, prompt, limit)
        answers = item["answers"] if isinstance(item["answers"], list) else [item["answers"]]
        score = score_prediction(item.get("dataset", ""), out["prediction"], answers, item.get("all_classes"))
        return {"score": float(score), "kept_fraction": float(out["kept_fraction"])}

    def full_score(self, item: Mapping[str, Any]) -> float:
        """The full cache's score on ``item`` (the model must not be attached)."""
        key = item["_id"]
        if key not in self._full:
            self._full[key] = self.run_item(item)["score"]
        return self._full[key]

    def evaluate(self, vector: np.ndarray, items: list[dict]) -> dict[str, float]:
        """Task-score ratio to the full cache, and kept fraction, of one parameter vector."""
        scorer = self.scorer_for(vector)
        full = {item["_id"]: self.full_score(item) for item in items}
        results = []
        try:
            for item in items:
                size = self.max_kv_size(len(prepare_prompt(self.tokenizer, item, None, self.max_tokens, None)[0]))
                attach(self.model, scorer, max_kv_size=size, probe=False)
                results.append((item, self.run_item(item)))
        finally:
            detach(self.model)
        by_task: dict[str, tuple[list[float], list[float]]] = {}
        for item, result in results:
            scores, references = by_task.setdefault(item.get("dataset", ""), ([], []))
            scores.append(result["score"])
            references.append(full[item["_id"]])
        ratios = [np.mean(s) / np.mean(r) for s, r in by_task.values() if np.mean(r) > 0]
        quality = float(np.mean(ratios)) if ratios else float(np.mean([r["score"] for _, r in results]))
        kept_fraction = float(np.mean([r["kept_fraction"] for _, r in results]))
        return {
            "fitness": quality - self.memory_penalty * kept_fraction,
            "quality": quality,
            "kept_fraction": kept_fraction,
            "tasks_scored": len(ratios),
        }


def generation_fitness(
    n: int = 4172, model: str | None = None, options: Mapping[str, str] | None = None
) -> GenerationFitness:
    """Factory for ``namm evolve --fitness generation``.

    Options (``--fitness-arg KEY=VALUE``): those of the likelihood fitness
    (``tasks``, ``length``, ``pool``, ``items``, ``memory_penalty``,
    ``calibration_items``, ``data_seed``, ``text``, ``budget``) and ``max_tokens`` (answer
    length; default: the task's own, e.g. 32 for needles).
    """
    return build_harness_fitness(GenerationFitness, "generation", n, model, options, extra={"max_tokens": ""})
