"""What the fitness functions built on the evaluation harness share.

Both real objectives (answer likelihood, :mod:`.likelihood`; generated-answer
task scores, :mod:`.generation`) score a member by attaching the NAMM built
from its vector to the language model and running items of the evaluation
harness through it. They share: the item pool (generated once from a seed), the
items of a generation (the same for every member and rank), the normalisation
statistics, calibrated as the reference does at its first evaluation (a NAMM
with all-zero parameters, which evicts nothing, runs over calibration items and
the pooled mean/variance of the 17 EMA bins of every call, layer, head and
token is kept), and the option parsing of their factories.
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping

import numpy as np

from ..config import NAMMConfig
from ..integration import attach, detach
from ..namm import NAMM
from ..policies import NAMMScorer
from ..policies.base import EvictionContext, Scores
from .options import FitnessError, float_option, int_option

#: Options every harness fitness takes (``--fitness-arg KEY=VALUE``), with defaults.
DEFAULTS = {
    "tasks": "passkey,needle",
    "length": "1024",
    "pool": "24",
    "items": "4",
    "memory_penalty": "0.25",
    "calibration_items": "4",
    "data_seed": "1234",
    "budget": "",
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


class HarnessFitness:
    """Base of the harness fitness functions (the :mod:`namm_mlx.evolve.fitness`
    contract); subclasses implement :meth:`evaluate` and :meth:`run_item`."""

    def __init__(self, model: Any, tokenizer: Any, items: list[dict], calibration: list[dict], options: dict) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.pool, self.calibration = items, calibration
        self.per_generation = options["items"]
        self.memory_penalty = options["memory_penalty"]
        self.data_seed = options["data_seed"]
        self.budget: float | None = options.get("budget")
        self.config = NAMMConfig()
        self.norm: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.key_probe: np.ndarray | None = None

    def run_item(self, item: Mapping[str, Any]) -> Any:
        """Run one item through the model as currently attached (calibration uses it)."""
        raise NotImplementedError

    def evaluate(self, vector: np.ndarray, items: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def calibrate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalisation statistics from an all-zero NAMM over the calibration items."""
        scorer = CalibratingScorer(NAMM.zeros(self.config))
        attach(self.model, scorer, probe=False)
        try:
            for item in self.calibration:
                self.run_item(item)
        finally:
            detach(self.model)
        if scorer.count == 0:
            raise FitnessError("calibration ran no NAMM step: use items of at least 512 tokens")
        self.norm = scorer.statistics()
        return self.norm

    def max_kv_size(self, prompt_tokens: int) -> int | None:
        """The fixed budget in tokens per layer for a prompt (None: the NAMM's
        threshold decides): ``budget`` is a share of the prompt when <= 1,
        else a token count."""
        if self.budget is None:
            return None
        if self.budget <= 1.0:
            return max(1, math.ceil(self.budget * prompt_tokens))
        return int(self.budget)

    def scorer_for(self, vector: np.ndarray) -> NAMMScorer:
        """The member's scorer: ranked by score under a fixed budget, else thresholded."""
        return NAMMScorer(self.namm_for(vector), ranked=self.budget is not None)

    def namm_for(self, vector: np.ndarray) -> NAMM:
        """The member's NAMM: its weights, with the run's statistics (calibrating
        first if it has none), settings and key probe."""
        if self.norm is None:
            self.calibrate()
        mean, var, count = self.norm
        return NAMM.from_flat(vector, mean, var, self.config, count, key_probe=self.key_probe)

    def adopt(self, norm: tuple[np.ndarray, np.ndarray], config: NAMMConfig, key_probe: np.ndarray | None) -> None:
        """Score members as the run's NAMMs are exported: with its normalisation
        buffers, settings and key probe."""
        self.norm = (norm[0], norm[1], None)
        self.config, self.key_probe = config, key_probe

    def items_for(self, generation: int) -> list[dict]:
        """The items of a generation: the same for every member (and every rank)."""
        rng = random.Random(f"{self.data_seed}-{generation}")
        return rng.sample(self.pool, min(self.per_generation, len(self.pool)))

    def __call__(self, members: np.ndarray, member_ids: list[int], *, context: Any = None) -> list[dict]:
        items = self.items_for(context.generation if context is not None else 0)
        return [self.evaluate(row, items) for row in np.asarray(members, dtype=np.float64)]


def build_harness_fitness(
    cls: type[HarnessFitness],
    name: str,
    n: int,
    model: str | None,
    options: Mapping[str, str] | None,
    extra: Mapping[str, str] | None = None,
) -> HarnessFitness:
    """Parse the shared options (plus ``extra`` ones, passed through as strings
    in ``options["extra"]``), load the model and build the item pools."""
    from ..eval.tasks import TASK_NAMES, TextSource, make_items
    from ..models import load_model

    opts = {**DEFAULTS, **dict(extra or {}), **dict(options or {})}
    known = set(DEFAULTS) | set(extra or {}) | {"text"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise FitnessError(f"unknown option(s) for fitness {name!r}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    tasks = [t.strip() for t in opts["tasks"].split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASK_NAMES]
    if bad:
        raise FitnessError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(TASK_NAMES)}")
    parsed: dict[str, Any] = {
        "length": int_option(opts, "length", 1024),
        "pool": int_option(opts, "pool", 24),
        "items": int_option(opts, "items", 4),
        "calibration_items": int_option(opts, "calibration_items", 4),
        "data_seed": int_option(opts, "data_seed", 1234),
        "memory_penalty": float_option(opts, "memory_penalty", 0.25, positive=False),
        "budget": float_option(opts, "budget", 0.0, positive=True) if opts.get("budget") else None,
        "extra": {k: opts[k] for k in (extra or {})},
    }
    if n != NAMMConfig().param_size:
        raise FitnessError(f"fitness {name!r} evolves a NAMM of {NAMMConfig().param_size:,} parameters, not {n:,}")
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
    return cls(loaded, tokenizer, pool, calibration, parsed)
