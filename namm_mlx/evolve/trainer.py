"""The evolution loop: CMA-ES generations, checkpoints, logs, NAMM export, resume.

:func:`evolve` knows nothing about how members are scored: it calls a fitness function
(see :mod:`namm_mlx.evolve.fitness` for the contract) and, with several processes, gives
each rank its share of the population (rank ``r`` of ``W`` scores members ``r, r+W, ...``).

Run folder (written by rank 0 only)::

    out_dir/state.npz    the authoritative checkpoint: CMA-ES arrays + one embedded JSON
                         document (run configuration, generation, CMA-ES scalars, RNG
                         state), written to a temp file and ``os.replace``d, so it is
                         always one complete, self-consistent generation
    out_dir/state.json   a readable copy of that JSON (informational; never read back)
    out_dir/log.jsonl    one line per completed generation: best/mean/worst fitness, sigma,
                         population mean kept fraction, then each member's fitness
                         and kept fraction (``fitness``, ``kept``) and the seconds taken
    out_dir/fitness.png  best and mean fitness and kept fraction per generation, redrawn
                         from the log after every generation (informational)
    out_dir/namm/        the current CMA-ES mean as a NAMM folder (``NAMM.load``), with
                         provenance (generation/iteration, fitness, seed, ...)

Order per generation: log line (flushed), then checkpoint, then NAMM folder. A kill at
any point loses at most the generation in progress: ``resume`` restarts from the
checkpoint and rewrites the log to exactly its generations (dropping a torn last line or a
line of a generation whose checkpoint never landed), then re-exports the NAMM; the
generation is then recomputed identically (same RNG state, deterministic fitness), so the
final state equals an uninterrupted run's.

Curriculum (spec §6.3/§7.3): ``stages`` is a list of ``(name, generations, fitness_fn)``.
All stages continue the SAME CMA-ES run (mean, sigma, C, paths, generation counter) like
the reference's ``init_from`` of the previous stage's checkpoint; the log records each
generation's stage.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import NAMMConfig
from .cma_es import CMAES, CMAESError, DEFAULT_SIGMA
from .distributed import Collective, DistributedError
from .fitness import EvalContext

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

RUN_FORMAT = "namm-mlx-evolve/1"
STATE_FILE = "state.npz"
SUMMARY_FILE = "state.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "fitness.png"
NAMM_DIR = "namm"
DEFAULT_POP_SIZE = 16
DEFAULT_STAGE = "main"
_RUN_FILES = {STATE_FILE, SUMMARY_FILE, LOG_FILE, PLOT_FILE, NAMM_DIR}


class EvolveError(ValueError):
    """A run that cannot start or continue; the message is one user-facing line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: ``generations`` generations scored by ``fitness_fn``."""

    name: str
    generations: int
    fitness_fn: Callable[..., list[dict]] | None = None


@dataclass
class InitSource:
    """A starting point: a flat vector and the normalisation buffers that belong to it."""

    vector: np.ndarray
    norm_mean: np.ndarray
    norm_var: np.ndarray
    provenance: dict[str, str]


@dataclass
class RunState:
    """A run folder's checkpoint, as loaded."""

    es: CMAES
    run: dict[str, Any]  # the embedded JSON document (configuration, generation, ...)
    norm_mean: np.ndarray
    norm_var: np.ndarray

    @property
    def generation(self) -> int:
        return self.es.generation


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
        raw = collective.share_from_root(payload, _describe(error) if error is not None else None)
        if not collective.is_root:
            state = _unpack(np.load(io.BytesIO(raw), allow_pickle=False), "rank 0's state")
    if error is not None:
        if isinstance(error, OSError):
            raise EvolveError(f"cannot prepare {out}: {_describe(error)}") from error
        raise error
    assert state is not None
    try:
        return _run(out, plan, state, collective, config, progress)
    finally:
        if lock is not None:
            lock.release()


LOCK_FILE = ".lock"


class _RunLock:
    """An exclusive ``flock`` on ``out_dir/.lock`` for as long as a run uses the folder.

    Two processes continuing one run would both append to its log and race on its
    checkpoint; the second is refused at once. The kernel drops the lock when the
    holder dies (``kill -9`` included), so a stale lock file never blocks a resume.
    A folder created only to hold the lock is removed again on release if the run
    never wrote to it.
    """

    def __init__(self, out: Path) -> None:
        import fcntl

        if out.exists() and not out.is_dir():
            raise EvolveError(f"{out} exists and is not a directory")
        self.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.path = out / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(self.fd)
            raise EvolveError(
                f"{out} is in use by another evolve run (process {holder}); wait for it to finish or choose another folder"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd < 0:
            return
        if self.created and not any(p.name != LOCK_FILE for p in self.out.iterdir()):
            self.path.unlink(missing_ok=True)
            self.out.rmdir()
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = -1


def _remove_stale_temps(out: Path) -> None:
    """Temp files a killed writer left behind (each write goes to a temp file that is
    renamed into place): the checkpoint, log, summary and plot, and the NAMM folder's."""
    for name in (STATE_FILE, SUMMARY_FILE, LOG_FILE, PLOT_FILE):
        for tmp in out.glob(f".{name}-*.tmp"):
            tmp.unlink(missing_ok=True)
    for pattern in (".namm-*.safetensors", ".namm_config-*.json"):
        for tmp in (out / NAMM_DIR).glob(pattern):
            tmp.unlink(missing_ok=True)


def load_run(run_dir: str | os.PathLike) -> RunState:
    """Load ``run_dir/state.npz`` (raises :class:`EvolveError` if missing or damaged)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise EvolveError(f"no evolution run in {run_dir}: {STATE_FILE} is missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return _unpack(npz, str(path))
    except EvolveError:
        raise
    except Exception as err:  # zipfile/numpy errors on a damaged file
        raise EvolveError(f"{path} is damaged or not an evolution checkpoint ({_describe(err)})") from None


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The parseable records of ``run_dir/log.jsonl`` in file order."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for raw in path.read_bytes().split(b"\n"):
        record = _parse_log_line(raw)
        if record is not None:
            records.append(record)
    return records


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, config: NAMMConfig | None = None):
    """Write the run's current CMA-ES mean as a NAMM folder at ``out_dir``; returns the NAMM."""
    from ..convert import check_output_dir

    state = load_run(run_dir)
    config = config or NAMMConfig()
    if state.es.n != config.param_size:
        raise EvolveError(
            f"the run in {run_dir} evolves {state.es.n:,} parameters, not a {config.param_size:,}-parameter NAMM"
        )
    target = Path(out_dir)
    check_output_dir(target)
    last = _last_record(Path(run_dir), state.generation)
    return _save_namm(target, state, last, config)


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


# ------------------------------------------------------------------------ planning


def _plan(fitness_fn: Any, stages: Sequence[Any] | None, generations: int | None) -> list[Stage] | None:
    """The curriculum as Stage objects (generations of a single stage may be None = resume)."""
    if stages is not None:
        if fitness_fn is not None:
            raise EvolveError("pass either fitness_fn or stages, not both")
        plan = []
        for item in stages:
            stage = item if isinstance(item, Stage) else Stage(*item)
            if not isinstance(stage.name, str) or not stage.name:
                raise EvolveError(f"stage names must be non-empty strings, got {stage.name!r}")
            open_count = stage.generations is None and len(stages) == 1  # resume: the stored target
            if not open_count and (not _is_int(stage.generations) or stage.generations < 0):
                raise EvolveError(f"stage {stage.name!r} needs a non-negative generation count")
            if not callable(stage.fitness_fn):
                raise EvolveError(f"stage {stage.name!r} has no fitness function")
            plan.append(stage)
        if not plan:
            raise EvolveError("stages is empty")
        if len({s.name for s in plan}) != len(plan):
            raise EvolveError("stage names must be unique")
        total = sum(s.generations or 0 for s in plan)
        if generations is not None and generations != total:
            raise EvolveError(f"generations={generations} disagrees with the stages' total of {total}")
        return plan
    if not callable(fitness_fn):
        raise EvolveError("evolve() needs a fitness function (or stages)")
    if generations is not None and (not _is_int(generations) or generations < 0):
        raise EvolveError(f"generations must be a non-negative int, got {generations!r}")
    return [Stage(DEFAULT_STAGE, generations, fitness_fn)]  # type: ignore[arg-type]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _stage_table(stages: Sequence[Mapping[str, Any] | Stage]) -> list[tuple[str, int]]:
    return [(s.name, int(s.generations)) if isinstance(s, Stage) else (s["name"], int(s["generations"])) for s in stages]


def _stage_at(table: list[tuple[str, int]], generation: int) -> tuple[int, str]:
    """(index, name) of the stage that runs ``generation`` (1-based)."""
    end = 0
    for index, (name, count) in enumerate(table):
        end += count
        if generation <= end:
            return index, name
    return len(table) - 1, table[-1][0]


def _resolve_plan(plan: list[Stage], run: Mapping[str, Any]) -> list[Stage]:
    """Fill a single stage's open generation count from the stored target."""
    if len(plan) == 1 and plan[0].generations is None:
        return [Stage(plan[0].name, int(run["generations"]), plan[0].fitness_fn)]
    return plan


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
    if init_from is not None:
        init = load_init(init_from, config)
        init_vector, norm = init.vector, (init.norm_mean, init.norm_var)
        metadata.update(init.provenance)
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
        "seconds": 0.0,
        "last": None,
    }
    state = RunState(es, run, norm_mean, norm_var)
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


def _note(enabled: bool, message: str) -> None:
    if enabled:
        print(f"note: {message}", file=sys.stderr, flush=True)


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
                raise EvolveError(f"cannot write the checkpoint in {out}: {_describe(write_error)}")
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


# ------------------------------------------------------------------- persistence


def _state_arrays(state: RunState) -> dict[str, np.ndarray]:
    cma = state.es.state_dict()
    arrays = {f"cma.{k}": v for k, v in cma.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in cma.items() if not isinstance(v, np.ndarray)}
    doc = {**state.run, "generation": state.es.generation, "cma": scalars}
    arrays["norm.mean"] = np.asarray(state.norm_mean, dtype=np.float64)
    arrays["norm.var"] = np.asarray(state.norm_var, dtype=np.float64)
    arrays["run_json"] = np.frombuffer(json.dumps(doc, allow_nan=False).encode(), dtype=np.uint8)
    return arrays


def _pack(state: RunState) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **_state_arrays(state))
    return buf.getvalue()


def _unpack(npz: Any, where: str) -> RunState:
    try:
        doc = json.loads(bytes(np.asarray(npz["run_json"], dtype=np.uint8)).decode())
        if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
            raise EvolveError(f"{where} is not an evolution checkpoint of format {RUN_FORMAT}")
        cma = dict(doc.pop("cma"))
        for key in npz.files:
            if key.startswith("cma."):
                cma[key[4:]] = npz[key]
        es = CMAES.from_state_dict(cma)
        norm_mean, norm_var = np.asarray(npz["norm.mean"]), np.asarray(npz["norm.var"])
    except KeyError as err:
        raise EvolveError(f"{where} lacks {err.args[0]!r}; it is not a complete evolution checkpoint") from None
    except CMAESError as err:
        raise EvolveError(f"{where}: {err}") from None
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        if isinstance(err, EvolveError):
            raise
        raise EvolveError(f"{where} is damaged ({_describe(err)})") from None
    if doc.get("generation") != es.generation:
        raise EvolveError(f"{where} is inconsistent: generation {doc.get('generation')} vs CMA-ES {es.generation}")
    return RunState(es, doc, norm_mean.astype(np.float64), norm_var.astype(np.float64))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write(target: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what a plain open() would give
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _write_checkpoint(out: Path, state: RunState) -> None:
    arrays = _state_arrays(state)
    _atomic_write(out / STATE_FILE, lambda fh: np.savez(fh, **arrays))
    summary = json.loads(bytes(arrays["run_json"]).decode())
    summary["cma"].pop("rng", None)
    summary["note"] = f"informational copy; the checkpoint is {STATE_FILE}"
    _atomic_write(out / SUMMARY_FILE, lambda fh: fh.write(json.dumps(summary, indent=2) + "\n"), binary=False)


def write_fitness_plot(run_dir: str | os.PathLike) -> Path | None:
    """Draw ``run_dir/fitness.png`` from the run's log (atomically); None if the
    log is empty or matplotlib (the ``[plot]`` extra) is missing."""
    from ..eval.plot import plot_fitness_curve, plots_available

    out = Path(run_dir)
    records = read_log(out)
    if not records or not plots_available():
        return None
    _atomic_write(out / PLOT_FILE, lambda fh: plot_fitness_curve(records, fh))
    return out / PLOT_FILE


def _append_log(out: Path, record: Mapping[str, Any]) -> None:
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(out / LOG_FILE, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _parse_log_line(raw: bytes) -> dict[str, Any] | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not _is_int(record.get("generation")):
        return None
    return record


def _rewrite_log(out: Path, generation: int, progress: bool) -> None:
    """Keep exactly the log lines of generations 1..``generation`` (in order)."""
    path = out / LOG_FILE
    kept: list[bytes] = []
    if path.is_file():
        for raw in path.read_bytes().split(b"\n"):
            record = _parse_log_line(raw)
            if record is not None and record["generation"] == len(kept) + 1 and record["generation"] <= generation:
                kept.append(raw.strip())
    if len(kept) < generation:
        _note(progress, f"{path} has {len(kept)} of the checkpoint's {generation} generations")
    _atomic_write(path, lambda fh: fh.write(b"".join(line + b"\n" for line in kept)))


def _last_record(out: Path, generation: int) -> dict[str, Any] | None:
    records = [r for r in read_log(out) if r["generation"] == generation]
    return records[-1] if records else None


def _save_namm(target: Path, state: RunState, record: Mapping[str, Any] | None, config: NAMMConfig):
    from ..convert import converter_name
    from ..namm import NAMM

    es, run = state.es, state.run
    meta = dict(run.get("metadata", {}))
    meta.update(
        {
            "source": "namm evolve",
            "converter": converter_name(),
            "generation": str(es.generation),
            "iteration": str(es.generation),
            "seed": str(es.seed),
            "pop_size": str(es.pop_size),
            "separable": str(es.separable).lower(),
            "sigma": repr(es.sigma),
            "member": "mean",
        }
    )
    if record is not None:
        meta["stage"] = str(record["stage"])
        meta["fitness"] = repr(record["mean"])  # population mean fitness of that generation
        meta["best_fitness"] = repr(record["best"])
    namm = NAMM.from_flat(es.mean, state.norm_mean, state.norm_var, config, metadata=meta)
    namm.save(target)
    return namm


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (EvolveError, CMAESError, DistributedError)):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ----------------------------------------------------------------------- progress


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per
    generation otherwise (logs, pipes)."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.enabled = enabled and total > start
        self.total = total
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.dirty = False

    def update(self, gen: int, record: Mapping[str, Any], seconds_per_gen: float) -> None:
        if not self.enabled:
            return
        eta = _duration(seconds_per_gen * (self.total - gen))
        kept = record.get("kept_fraction")
        kept_text = f" kept {kept:.3f}" if kept is not None else ""
        line = (
            f"gen {gen}/{self.total} [{record['stage']}] best {record['best']:.6g} mean {record['mean']:.6g}"
            f"{kept_text} sigma {record['sigma']:.4g} | {seconds_per_gen:.2f}s/gen ETA {eta}"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.dirty:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


#: Error types whose messages are meant for users (for the CLI).
EVOLVE_ERRORS = (EvolveError, CMAESError, DistributedError)
