"""Fitness functions for ``namm evolve``: the contract and the registry.

Contract
--------
A fitness function scores a batch of population members::

    fitness_fn(members, member_ids, *, context=None) -> list[dict]

* ``members``: float64 ``[k, n]``, one candidate parameter vector per row (for a NAMM,
  the 4,172-value flat vector of spec §5.1; build it with ``NAMM.from_flat(row,
  norm_mean, norm_var)``, which rounds to float32 like the reference).
* ``member_ids``: the members' indices in the population (``k`` ints). With several
  processes, rank ``r`` of ``W`` receives members ``r, r+W, r+2W, ...``, so a function
  must score each member on its own: the result for member ``i`` may depend on ``i``, the
  generation and the seed, but never on which other members share the call or on the
  rank. This is what makes a distributed run equal a single-process one, and a resumed run
  equal an uninterrupted one.
* ``context`` (only passed when the function accepts a ``context`` keyword or
  ``**kwargs``): an :class:`EvalContext` with the generation being evaluated, the stage
  name, the run seed, rank and world size. Use ``context.generation`` and
  ``context.seed`` to sample the same prompts for every member of a generation (the
  reference samples 64 prompts per task per generation, shared by all members, §7.2).
* Returns one dict per member, in ``members`` order, with at least ``"fitness"`` (a
  finite float, higher is better) and optionally ``"kept_fraction"`` (the fraction of the
  KV cache the NAMM kept, for the log). Other keys are ignored by the trainer.

Registry
--------
:data:`FITNESS` maps the names accepted by ``namm evolve --fitness`` to factories::

    factory(n=4172, model=None, options={"key": "value", ...}) -> fitness_fn

``options`` are the ``--fitness-arg KEY=VALUE`` strings; a factory must reject keys it
does not know with :class:`FitnessError`. The real objectives come from the evaluation
harness in ``namm_mlx.eval``: ``likelihood`` (answer likelihood under the evicted cache,
fast on a CPU; ``replay`` is its several-times-cheaper approximation over recorded
full-cache prefills) and ``generation`` (task scores of greedy answers relative to the full
cache, spec §7.2).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from .options import FitnessError, float_option, int_option

__all__ = [
    "EvalContext",
    "FITNESS",
    "FitnessError",
    "FitnessFn",
    "make_fitness",
    "synthetic_fitness",
]


@dataclass(frozen=True)
class EvalContext:
    """Where an evaluation sits in the run (passed to fitness functions that want it)."""

    generation: int  # 1-based generation being evaluated
    stage: str
    seed: int
    rank: int
    world_size: int


class FitnessFn(Protocol):
    def __call__(self, members: np.ndarray, member_ids: list[int], **kwargs: Any) -> list[dict]: ...


FitnessFactory = Callable[..., FitnessFn]

SYNTHETIC_TARGET_SEED = 20240607
SYNTHETIC_SCALE = 0.5
SYNTHETIC_DIMS = 16


def synthetic_fitness(n: int = 4172, model: str | None = None, options: Mapping[str, str] | None = None) -> FitnessFn:
    """SMOKE TEST ONLY: negative squared distance to a fixed random target.

    ``fitness = -mean_j (x[i_j] - t_j)^2 / scale^2`` over ``dims`` coordinates ``i_j``
    chosen at random (fixed seed), with ``t ~ N(0, scale^2)``; the other coordinates are
    neutral, so CMA-ES makes visible progress within a few dozen generations despite the
    4,172 dimensions. It exercises the whole loop (sampling, checkpoints, logs, NAMM
    export, distributed gathering) in milliseconds without a language model; the evolved
    NAMM is meaningless. ``kept_fraction`` reports the share of those coordinates within
    ``scale / 4`` of the target (a stand-in for the real cache statistic).

    Options (``--fitness-arg KEY=VALUE``): ``dims`` (default 16), ``scale`` (0.5),
    ``target_seed``, ``delay`` (seconds of simulated evaluation time per member, for
    exercising interruption and progress output)."""
    opts = dict(options or {})
    known = {"dims", "scale", "target_seed", "delay"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise FitnessError(
            f"unknown option(s) for fitness 'synthetic': {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    if model is not None:
        raise FitnessError("fitness 'synthetic' is a smoke test without a language model; drop --model")
    scale = float_option(opts, "scale", SYNTHETIC_SCALE, positive=True)
    delay = float_option(opts, "delay", 0.0, positive=False)
    dims = int_option(opts, "dims", SYNTHETIC_DIMS)
    target_seed = int_option(opts, "target_seed", SYNTHETIC_TARGET_SEED)
    if not 1 <= dims <= n:
        raise FitnessError(f"fitness option dims must be between 1 and {n}, got {dims}")
    rng = np.random.default_rng(target_seed)
    coords = np.sort(rng.choice(n, dims, replace=False))
    target = rng.normal(0.0, scale, dims)

    def fitness(members: np.ndarray, member_ids: list[int]) -> list[dict]:
        out = []
        for row in np.asarray(members, dtype=np.float64):
            if delay:
                time.sleep(delay)
            diff = row[coords] - target
            out.append(
                {
                    "fitness": -float(np.mean(diff * diff)) / scale**2,
                    "kept_fraction": float(np.mean(np.abs(diff) < scale / 4)),
                }
            )
        return out

    return fitness


def likelihood_fitness(n: int = 4172, model: str | None = None, options: Mapping[str, str] | None = None) -> FitnessFn:
    """Relative answer likelihood under the evicted cache minus a memory penalty
    (:mod:`namm_mlx.evolve.likelihood`; imported lazily, it loads a language model)."""
    from .likelihood import likelihood_fitness as factory

    return factory(n=n, model=model, options=options)


def generation_fitness(n: int = 4172, model: str | None = None, options: Mapping[str, str] | None = None) -> FitnessFn:
    """Task scores of greedy answers under the evicted cache relative to the full
    cache's, per task, minus a memory penalty (:mod:`namm_mlx.evolve.generation`)."""
    from .generation import generation_fitness as factory

    return factory(n=n, model=model, options=options)


def replay_fitness(n: int = 4172, model: str | None = None, options: Mapping[str, str] | None = None) -> FitnessFn:
    """The likelihood fitness replayed over recorded full-cache prefills: several
    times cheaper, approximate after the first eviction (:mod:`namm_mlx.evolve.replay`)."""
    from .replay import replay_fitness as factory

    return factory(n=n, model=model, options=options)


#: ``--fitness`` name -> factory ``(n=..., model=..., options=...) -> fitness_fn``.
FITNESS: dict[str, FitnessFactory] = {
    "synthetic": synthetic_fitness,
    "likelihood": likelihood_fitness,
    "generation": generation_fitness,
    "replay": replay_fitness,
}

def make_fitness(name: str, n: int, model: str | None = None, options: Mapping[str, str] | None = None) -> FitnessFn:
    """The fitness function registered as ``name``, or a one-line :class:`FitnessError`."""
    factory = FITNESS.get(name)
    if factory is None:
        available = ", ".join(sorted(FITNESS))
        raise FitnessError(f"unknown fitness {name!r}; available: {available}")
    return factory(n=n, model=model, options=dict(options or {}))
