"""Local evolution of NAMMs: the reference CMA-ES, a resumable trainer, distributed scoring.

* :class:`CMAES` -- the reference's active CMA-ES (namm-spec §7.1) in float64 numpy,
  seeded and checkpointable; ``separable=True`` for sep-CMA-ES.
* :func:`evolve` -- the generation loop: any fitness function (contract in
  :mod:`namm_mlx.evolve.fitness`), curriculum stages continuing one CMA-ES run, an atomic
  checkpoint + JSONL log + NAMM folder after every generation, ``resume``.
* Several processes (one machine or many) split each population: start the same command
  under ``mlx.launch``, e.g. two local processes over the ring backend::

      mlx.launch -n 2 --backend ring -- namm evolve --out runs/a --fitness ... [options]

  (several hosts: ``mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- ...`` or a
  ``--hostfile``). Rank ``r`` of ``W`` scores members ``r, r+W, ...``; the fitness table
  is gathered with ``mx.distributed.all_sum``; every rank then runs the same CMA-ES update
  (same seed, state shared once from rank 0), checked each generation by a digest. Only
  rank 0 writes the run folder. The result equals a single-process run.
"""

from ..cma_es import CMAES, CMAESError, CMAParams, DEFAULT_SIGMA, cma_params, lazy_eig_interval
from .distributed import Collective, DistributedError
from .fitness import FITNESS, EvalContext, FitnessError, make_fitness, synthetic_fitness
from .trainer import (
    DEFAULT_POP_SIZE,
    EVOLVE_ERRORS,
    EvolveError,
    EvolveResult,
    InitSource,
    RunState,
    Stage,
    evolve,
    export_run,
    load_init,
    load_run,
    read_log,
    write_fitness_plot,
)

__all__ = [
    "CMAES",
    "CMAESError",
    "CMAParams",
    "Collective",
    "DEFAULT_POP_SIZE",
    "DEFAULT_SIGMA",
    "DistributedError",
    "EVOLVE_ERRORS",
    "EvalContext",
    "EvolveError",
    "EvolveResult",
    "FITNESS",
    "FitnessError",
    "InitSource",
    "RunState",
    "Stage",
    "cma_params",
    "evolve",
    "export_run",
    "lazy_eig_interval",
    "load_init",
    "load_run",
    "make_fitness",
    "read_log",
    "write_fitness_plot",
    "synthetic_fitness",
]
