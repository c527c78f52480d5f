"""The evolution loop: CMA-ES generations, checkpoints, logs, NAMM export, resume.

:func:`evolve` knows nothing about how members are scored: it calls a fitness function
(see :mod:`namm_mlx.evolve.fitness` for the contract) and, with several processes, gives
each rank its share of the population (rank ``r`` of ``W`` scores members ``r, r+W, ...``).

The run folder's files and their write order are in
:mod:`namm_mlx.evolve.run_folder`.

Curriculum (spec §6.3/§7.3): ``stages`` is a list of ``(name, generations, fitness_fn)``.
All stages continue the SAME CMA-ES run (mean, sigma, C, paths, generation counter) like
the reference's ``init_from`` of the previous stage's checkpoint; the log records each
generation's stage.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import NAMMConfig
from ..errors import describe
from ..progress import StatusLine, format_duration
from ..cma_es import CMAES, CMAESError, DEFAULT_SIGMA
from .distributed import Collective, DistributedError
from .fitness import EvalContext
from .curriculum import Stage, _plan, _resolve_plan, _stage_at, _stage_table
from .run_folder import (
    DEFAULT_POP_SIZE,
    _RUN_FILES,
    LOG_FILE,
    NAMM_DIR,
    RUN_FORMAT,
    STATE_FILE,
    EvolveError,
    RunState,
    _append_log,
    _last_record,
    _note,
    _pack,
    _remove_stale_temps,
    _rewrite_log,
    _RunLock,
    _save_namm,
    _unpack,
    _write_checkpoint,
    export_run,
    load_run,
    read_log,
    write_fitness_plot,
)

__all__ = [
    "DEFAULT_POP_SIZE",
    "EVOLVE_ERRORS",
    "EvolveError",
    "EvolveResult",
    "InitSource",
    "LOG_FILE",
    "NAMM_DIR",
    "RunState",
    "STATE_FILE",
    "Stage",
    "evolve",
    "export_run",
    "load_init",
    "load_run",
    "read_log",
]


@dataclass
class InitSource:
    """A starting point: a flat vector and the normalisation buffers that belong to it.

    From a NAMM folder it also holds the NAMM's settings and key probe. CMA-ES
    searches the weights only; the members keep the rest, since the weights were
    fitted to work with it (a BAM fitted with a 128-token window scores
    differently without one).
    """

    vector: np.ndarray
    norm_mean: np.ndarray
    norm_var: np.ndarray
    provenance: dict[str, str]
    config: NAMMConfig | None = None  # None: the reference's (a checkpoint or flat vector)
    key_probe: np.ndarray | None = None


@dataclass
class EvolveResult:
    """Where a run stands after :func:`evolve` returns."""

    out_dir: Path
    generation: int
    generations: int
    start_generation: int  # the generation this call started from (0 for a fresh run)
    mean: np.ndarray
    sigma: float
    best_fitness: float
    best_member: np.ndarray
    norm_mean: np.ndarray
    norm_var: np.ndarray
    namm_dir: Path | None
    log_path: Path
    last: dict[str, Any] | None  # the last log record
    seconds: float  # wall time of this call's generations
    rank: int = 0
    world_size: int = 1


# ----------------------------------------------------------------------------- public


def evolve(
    fitness_fn: Callable[..., list[dict]] | None = None,
    out_dir: str | os.PathLike | None = None,
    generations: int | None = None,
    pop_size: int | None = None,
    seed: int | None = None,
    init_vector: Any = None,
    norm: tuple[Any, Any] | None = None,
    separable: bool | None = None,
    resume: bool = False,
    progress: bool = True,
    *,
    stages: Sequence[Stage | tuple] | None = None,
    sigma: float | None = None,
    eig_every: int | None = None,
    group: Any = None,
    metadata: Mapping[str, Any] | None = None,
    export_namm: bool | None = None,
    namm_config: NAMMConfig | None = None,
    n: int | None = None,
    init_from: str | os.PathLike | None = None,
) -> EvolveResult:
    """Evolve parameters with CMA-ES until generation ``generations`` (a total count).

    ``fitness_fn(members [k, n], member_ids) -> [{"fitness": float, "kept_fraction"?:
    float}, ...]`` scores members (contract: :mod:`namm_mlx.evolve.fitness`); or pass
    ``stages=[(name, generations, fitness_fn), ...]`` for a curriculum continuing one
    CMA-ES run. ``init_vector``/``norm=(mean, var)`` set the starting mean and the frozen
    normalisation buffers stored with every exported NAMM (default: zeros, and 0/1
    buffers); or ``init_from`` names a NAMM folder or reference checkpoint to take both
    from (:func:`load_init`; read by rank 0 only, and only when starting fresh). The
    dimension is ``len(init_vector)``, else ``n``, else the NAMM's 4,172.

    ``resume=True`` continues the checkpoint in ``out_dir`` (which then wins over
    ``init_vector``/``norm``, like the reference's ``latest.pt`` over ``init_from``);
    ``pop_size``/``seed``/``separable``/``eig_every`` left as None are taken from it, and
    ``generations`` defaults to the stored target. Without a checkpoint, ``resume`` starts
    fresh. A fresh run needs a new or empty ``out_dir``.

    ``group``: an ``mx.distributed`` group or :class:`Collective` (default
    ``mx.distributed.init()``, a single process unless started by ``mlx.launch``).
    Every rank must call ``evolve`` with the same arguments; only rank 0 touches
    ``out_dir``. ``export_namm`` (default: when ``n`` is the NAMM's size) writes
    ``out_dir/namm`` after every generation. ``progress`` prints one status line on
    stderr (rank 0)."""
    if out_dir is None:
        raise EvolveError("evolve() needs out_dir")
    if init_from is not None and (init_vector is not None or norm is not None):
        raise EvolveError("pass either init_from or init_vector/norm, not both")
    out = Path(out_dir)
    plan = _plan(fitness_fn, stages, generations)
    config = namm_config or NAMMConfig()
    collective = group if isinstance(group, Collective) else Collective(group)
    request = {
        "pop_size": pop_size,
        "seed": seed,
        "separable": separable,
        "sigma": sigma,
        "eig_every": eig_every,
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
        "export_namm": export_namm,
        "n": n,
    }
    state: RunState | None = None
    error: BaseException | None = None
    lock: _RunLock | None = None
    if collective.is_root:
        try:
            lock = _RunLock(out)
            state = _prepare(out, plan, request, init_vector, norm, resume, config, progress, init_from)
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = err
            if lock is not None:
                lock.release()
    if collective.size > 1:
        payload = _pack(state) if state is not None else None
        raw = collective.share_from_root(payload, describe(error) if error is not None else None)
        if not collective.is_root:
            state = _unpack(np.load(io.BytesIO(raw), allow_pickle=False), "rank 0's state")
    if error is not None:
        if isinstance(error, OSError):
            raise EvolveError(f"cannot prepare {out}: {describe(error)}") from error
        raise error
    assert state is not None
    try:
        return _run(out, plan, state, collective, config, progress)
    finally:
        if lock is not None:
            lock.release()


def load_init(path: str | os.PathLike, config: NAMMConfig | None = None) -> InitSource:
    """A starting point from a NAMM folder, a reference ``ckpt.pt``/``latest.pt``/``iter_N.pt``
    (its CMA-ES mean and stored normalisation buffers; its covariance, step size and paths
    are NOT carried over: the new run starts a fresh CMA-ES at that mean), or a flat
    ``.safetensors`` vector with ``norm.mean``/``norm.var``."""
    from ..convert import read_source
    from ..namm import NAMM

    source = Path(path)
    if source.is_dir():
        namm = NAMM.load(source)
        if config is not None and namm.config.param_size != config.param_size:
            raise EvolveError(f"{source} holds a {namm.config.param_size:,}-parameter NAMM")
        provenance = {"init_from": source.name}
        provenance.update({f"init_{k}": v for k, v in namm.metadata.items() if k in ("iteration", "source")})
        return InitSource(
            namm.to_flat().astype(np.float64),
            np.asarray(namm.norm_mean, dtype=np.float64),
            np.asarray(namm.norm_var, dtype=np.float64),
            provenance,
            namm.config,
            None if namm.key_probe is None else np.asarray(namm.key_probe, dtype=np.float32),
        )
    flat = read_source(source, "mean", None, config)
    provenance = {"init_from": source.name}
    if "source_sha256" in flat.provenance:
        provenance["init_sha256"] = flat.provenance["source_sha256"]
    if "iteration" in flat.provenance:
        provenance["init_iteration"] = flat.provenance["iteration"]
    return InitSource(
        np.asarray(flat.vector, dtype=np.float32).astype(np.float64).reshape(-1),
        np.asarray(flat.norm_mean, dtype=np.float64).reshape(-1),
        np.asarray(flat.norm_var, dtype=np.float64).reshape(-1),
        provenance,
    )


# ---------------------------------------------------------------------- preparing


def _prepare(
    out: Path,
    plan: list[Stage],
    request: Mapping[str, Any],
    init_vector: Any,
    norm: tuple[Any, Any] | None,
    resume: bool,
    config: NAMMConfig,
    progress: bool,
    init_from: str | os.PathLike | None = None,
) -> RunState:
    """Rank 0: load or create the run, and make the folder consistent with it."""
    if out.exists() and not out.is_dir():
        raise EvolveError(f"{out} exists and is not a directory")
    if out.is_dir():
        _remove_stale_temps(out)
    has_state = (out / STATE_FILE).is_file()
    if has_state and not resume:
        state = load_run(out)
        raise EvolveError(
            f"{out} already holds an evolution run (generation {state.generation}); "
            "pass --resume to continue it, or choose a new folder"
        )
    if has_state:
        state = load_run(out)
        _check_resume(state, plan, request, out)
        # the run's description follows how it is continued (e.g. an extended curriculum)
        state.run["metadata"] = {**state.run.get("metadata", {}), **request["metadata"]}
        if init_vector is not None or norm is not None or init_from is not None:
            _note(progress, f"resuming {out} at generation {state.generation}: the checkpoint wins over the initial vector")
        _rewrite_log(out, state.generation, progress)
        if state.run["export_namm"] and state.generation > 0:
            _save_namm(out / NAMM_DIR, state, _last_record(out, state.generation), config)
        return state

    if out.is_dir():
        leftovers = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        foreign = [name for name in leftovers if name not in _RUN_FILES]
        if foreign or (leftovers and not resume):
            raise EvolveError(
                f"output folder {out} is not empty ({', '.join(sorted(leftovers)[:3])}...) and holds no "
                f"evolution checkpoint ({STATE_FILE}); choose a new or empty folder"
            )
    if resume:
        _note(progress, f"no checkpoint in {out}: starting a fresh run")
    if any(s.generations is None for s in plan):
        raise EvolveError(f"no checkpoint in {out} to take the number of generations from; pass it to start the run")
    metadata = dict(request["metadata"])
    key_probe = None
    if init_from is not None:
        init = load_init(init_from, config)
        init_vector, norm = init.vector, (init.norm_mean, init.norm_var)
        metadata.update(init.provenance)
        config, key_probe = init.config or config, init.key_probe
    n = request["n"]
    mean = None
    if init_vector is not None:
        mean = np.asarray(init_vector, dtype=np.float64).reshape(-1)
        if n is not None and mean.size != n:
            raise EvolveError(f"init_vector has {mean.size:,} values but n = {n:,}")
        n = mean.size
    if n is None:
        n = config.param_size
    if norm is None:
        norm_mean, norm_var = np.zeros(config.n_bins), np.ones(config.n_bins)
    else:
        norm_mean, norm_var = (np.asarray(b, dtype=np.float64).reshape(-1) for b in norm)
        if norm_mean.size != norm_var.size:
            raise EvolveError("norm mean and var have different sizes")
        if not (np.isfinite(norm_mean).all() and np.isfinite(norm_var).all()) or (norm_var < 0).any():
            raise EvolveError("the normalisation buffers must be finite with non-negative variances")
    export = request["export_namm"]
    if export is None:
        export = n == config.param_size
    if export and n != config.param_size:
        raise EvolveError(f"cannot export a NAMM from {n:,} parameters (a NAMM has {config.param_size:,})")
    if export and norm_mean.size != config.n_bins:
        raise EvolveError(f"a NAMM needs {config.n_bins} normalisation bins, got {norm_mean.size}")
    es = CMAES(
        n,
        request["pop_size"] if request["pop_size"] is not None else DEFAULT_POP_SIZE,
        sigma=request["sigma"] if request["sigma"] is not None else DEFAULT_SIGMA,
        mean=mean,
        seed=request["seed"] if request["seed"] is not None else 0,
        separable=bool(request["separable"]),
        eig_every=request["eig_every"] if request["eig_every"] is not None else 1,
    )
    run = {
        "format": RUN_FORMAT,
        "generation": 0,
        "generations": sum(s.generations for s in plan),
        "stages": [{"name": s.name, "generations": s.generations} for s in plan],
        "n": es.n,
        "pop_size": es.pop_size,
        "seed": es.seed,
        "separable": es.separable,
        "sigma0": es.sigma,
        "eig_every": es.eig_every,
        "export_namm": bool(export),
        "metadata": metadata,
        "namm_config": config.to_dict(),
        "seconds": 0.0,
        "last": None,
    }
    state = RunState(es, run, norm_mean, norm_var, key_probe)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FILE).unlink(missing_ok=True)
    _write_checkpoint(out, state)
    if export:
        _save_namm(out / NAMM_DIR, state, None, config)
    return state


def _check_resume(state: RunState, plan: list[Stage], request: Mapping[str, Any], out: Path) -> None:
    es, run = state.es, state.run
    for key, have in (
        ("pop_size", es.pop_size),
        ("seed", es.seed),
        ("separable", es.separable),
        ("eig_every", es.eig_every),
        ("n", es.n),
    ):
        want = request[key]
        if want is not None and want != have:
            raise EvolveError(
                f"the run in {out} has {key} = {have!r}; resuming with {key} = {want!r} would not continue it "
                f"(leave it out or pass {have!r})"
            )
    resolved = _resolve_plan(plan, run)
    new_table = _stage_table(resolved)
    old_table = _stage_table(run["stages"])
    g = state.generation
    total = sum(count for _, count in new_table)
    if total < g:
        raise EvolveError(f"the run in {out} is already at generation {g}, past the requested {total}")
    for gen in range(1, g + 1):
        old, new = _stage_at(old_table, gen)[1], _stage_at(new_table, gen)[1]
        if old != new:
            raise EvolveError(
                f"the run in {out} evaluated generation {gen} with stage {old!r}, the new plan with {new!r}; "
                "a resumed curriculum must keep the stages already run"
            )


# --------------------------------------------------------------------------- loop


def _run(
    out: Path, plan: list[Stage], state: RunState, collective: Collective, config: NAMMConfig, progress: bool
) -> EvolveResult:
    plan = _resolve_plan(plan, state.run)
    es, run = state.es, state.run
    table = _stage_table(plan)
    total = sum(count for _, count in table)
    run["generations"] = total
    run["stages"] = [{"name": name, "generations": count} for name, count in table]
    start = es.generation
    root = collective.is_root
    bar = _Progress(progress and root, start, total)
    lam, rank, world = es.pop_size, collective.rank, collective.size
    ids = list(range(rank, lam, world))
    accepts_context = {id(s.fitness_fn): _accepts_context(s.fitness_fn) for s in plan}
    elapsed = 0.0
    last = run.get("last")
    try:
        for gen in range(start + 1, total + 1):
            index, stage_name = _stage_at(table, gen)
            stage = plan[index]
            t0 = time.perf_counter()
            population = es.ask()
            context = EvalContext(gen, stage_name, es.seed, rank, world)
            fit, kept, failure = _evaluate(stage, population[ids], ids, context, accepts_context[id(stage.fitness_fn)])
            if world == 1:
                if failure is not None:
                    raise failure
                fitness, kept_all = np.asarray(fit, np.float64), np.asarray(kept, np.float64)
            else:
                fitness, kept_all, failed = collective.gather_members(lam, ids, fit, kept, failure is not None)
                if failure is not None:
                    raise failure
                if failed:
                    raise DistributedError(f"rank(s) {', '.join(map(str, failed))} failed to evaluate generation {gen}")
            es.tell(fitness)
            seconds = time.perf_counter() - t0
            elapsed += seconds
            record = _record(gen, stage_name, fitness, kept_all, es, seconds)
            last = record
            write_error: BaseException | None = None
            if root:
                run["generation"] = gen
                run["seconds"] = float(run.get("seconds", 0.0)) + seconds
                run["last"] = {k: v for k, v in record.items() if k != "fitness"}
                try:
                    _append_log(out, record)
                    _write_checkpoint(out, state)
                    if run["export_namm"]:
                        _save_namm(out / NAMM_DIR, state, record, config)
                    write_fitness_plot(out)
                except OSError as err:
                    write_error = err
            if world > 1:
                failed = collective.check_agreement([es._mean], [es.sigma, es.generation], write_error is not None)
                if failed and write_error is None:
                    raise DistributedError(f"rank 0 could not write the checkpoint of generation {gen}")
            if write_error is not None:
                raise EvolveError(f"cannot write the checkpoint in {out}: {describe(write_error)}")
            bar.update(gen, record, elapsed / (gen - start))
    finally:
        bar.close()
    return EvolveResult(
        out_dir=out,
        generation=es.generation,
        generations=total,
        start_generation=start,
        mean=es.mean,
        sigma=es.sigma,
        best_fitness=es.best_fitness,
        best_member=es.best_member,
        norm_mean=state.norm_mean.copy(),
        norm_var=state.norm_var.copy(),
        namm_dir=out / NAMM_DIR if run["export_namm"] else None,
        log_path=out / LOG_FILE,
        last=last,
        seconds=elapsed,
        rank=rank,
        world_size=world,
    )


def _accepts_context(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "context" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _evaluate(
    stage: Stage, members: np.ndarray, ids: list[int], context: EvalContext, with_context: bool
) -> tuple[list[float], list[float], BaseException | None]:
    """Score this rank's members; a failure is returned (not raised) so that, with several
    ranks, everyone still reaches the exchange and stops together."""
    if not ids:
        return [], [], None
    try:
        if with_context:
            results = stage.fitness_fn(members, list(ids), context=context)
        else:
            results = stage.fitness_fn(members, list(ids))
        return (*_parse_results(results, len(ids), stage.name), None)
    except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised
        return [], [], err


def _parse_results(results: Any, count: int, stage: str) -> tuple[list[float], list[float]]:
    if isinstance(results, Mapping) or not isinstance(results, Sequence):
        raise EvolveError(f"the fitness function of stage {stage!r} must return a list of dicts, got {type(results).__name__}")
    if len(results) != count:
        raise EvolveError(f"the fitness function of stage {stage!r} returned {len(results)} results for {count} members")
    fitness, kept = [], []
    for i, item in enumerate(results):
        if not isinstance(item, Mapping) or "fitness" not in item:
            raise EvolveError(f"fitness result {i} of stage {stage!r} is not a dict with a 'fitness' key")
        try:
            value = float(item["fitness"])
        except (TypeError, ValueError):
            raise EvolveError(f"fitness result {i} of stage {stage!r}: fitness {item['fitness']!r} is not a number") from None
        if not math.isfinite(value):
            raise EvolveError(f"fitness result {i} of stage {stage!r} is {value} (must be finite)")
        fitness.append(value)
        k = item.get("kept_fraction")
        try:
            kept.append(float("nan") if k is None else float(k))
        except (TypeError, ValueError):
            raise EvolveError(f"fitness result {i} of stage {stage!r}: kept_fraction {k!r} is not a number") from None
    return fitness, kept


def _record(gen: int, stage: str, fitness: np.ndarray, kept: np.ndarray, es: CMAES, seconds: float) -> dict[str, Any]:
    finite_kept = kept[np.isfinite(kept)]
    return {
        "generation": gen,
        "stage": stage,
        "best": float(fitness.max()),
        "mean": float(fitness.mean()),
        "worst": float(fitness.min()),
        "sigma": es.sigma,
        "best_ever": es.best_fitness,
        "kept_fraction": float(finite_kept.mean()) if finite_kept.size else None,
        "fitness": [float(v) for v in fitness],
        "kept": [float(v) if np.isfinite(v) else None for v in kept],
        "seconds": round(seconds, 6),
    }


# ----------------------------------------------------------------------- progress


class _Progress:
    """The generation status line: fitness, sigma, seconds per generation, ETA."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.total = total
        self.line = StatusLine(enabled and total > start)

    def update(self, gen: int, record: Mapping[str, Any], seconds_per_gen: float) -> None:
        if not self.line.enabled:
            return
        eta = format_duration(seconds_per_gen * (self.total - gen))
        kept = record.get("kept_fraction")
        kept_text = f" kept {kept:.3f}" if kept is not None else ""
        self.line.show(
            f"gen {gen}/{self.total} [{record['stage']}] best {record['best']:.6g} mean {record['mean']:.6g}"
            f"{kept_text} sigma {record['sigma']:.4g} | {seconds_per_gen:.2f}s/gen ETA {eta}"
        )

    def close(self) -> None:
        self.line.close()


#: Error types whose messages are meant for users (for the CLI).
EVOLVE_ERRORS = (EvolveError, CMAESError, DistributedError)
