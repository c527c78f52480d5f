"""An evolution run folder: its files, its lock, its checkpoint and log.

Run folder (written by rank 0 only)::

    out_dir/state.npz    the authoritative checkpoint: CMA-ES arrays + one embedded JSON
                         document (run configuration, generation, CMA-ES scalars, RNG
                         state, the NAMM's settings), the normalisation buffers and
                         the key probe of the NAMM the run started from, written to a temp file and ``os.replace``d, so it is
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
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import NAMMConfig
from ..errors import NammError, describe
from ..files import UMASK, atomic_write, stale_temps
from ..cma_es import CMAES, CMAESError

RUN_FORMAT = "namm-mlx-evolve/1"
STATE_FILE = "state.npz"
SUMMARY_FILE = "state.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "fitness.png"
NAMM_DIR = "namm"
DEFAULT_POP_SIZE = 16
DEFAULT_STAGE = "main"
_RUN_FILES = {STATE_FILE, SUMMARY_FILE, LOG_FILE, PLOT_FILE, NAMM_DIR}


class EvolveError(NammError, ValueError):
    """A run that cannot start or continue; the message is one user-facing line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class RunState:
    """A run folder's checkpoint, as loaded."""

    es: CMAES
    run: dict[str, Any]  # the embedded JSON document (configuration, generation, ...)
    norm_mean: np.ndarray
    norm_var: np.ndarray
    #: the starting NAMM's key probe, which every member keeps (CMA-ES searches
    #: the BAM's weights only)
    key_probe: np.ndarray | None = None

    def namm_config(self, fallback: NAMMConfig | None = None) -> NAMMConfig:
        """The settings every member and exported NAMM has: the starting NAMM's
        (its BAM window, newest-query weight, probe span and share), or
        ``fallback`` for a run that recorded none."""
        stored = self.run.get("namm_config")
        if stored is None:
            return fallback or NAMMConfig()
        return NAMMConfig.from_dict(stored)

    @property
    def generation(self) -> int:
        return self.es.generation


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
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
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
    from ..namm import CONFIG_FILE, WEIGHTS_FILE

    targets = [out / name for name in (STATE_FILE, SUMMARY_FILE, LOG_FILE, PLOT_FILE)]
    for target in targets + [out / NAMM_DIR / WEIGHTS_FILE, out / NAMM_DIR / CONFIG_FILE]:
        for tmp in stale_temps(target):
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
        raise EvolveError(f"{path} is damaged or not an evolution checkpoint ({describe(err)})") from None


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
    config = state.namm_config(config)
    if state.es.n != config.param_size:
        raise EvolveError(
            f"the run in {run_dir} evolves {state.es.n:,} parameters, not a {config.param_size:,}-parameter NAMM"
        )
    target = Path(out_dir)
    check_output_dir(target)
    last = _last_record(Path(run_dir), state.generation)
    return _save_namm(target, state, last, config)


def _state_arrays(state: RunState) -> dict[str, np.ndarray]:
    cma = state.es.state_dict()
    arrays = {f"cma.{k}": v for k, v in cma.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in cma.items() if not isinstance(v, np.ndarray)}
    doc = {**state.run, "generation": state.es.generation, "cma": scalars}
    arrays["norm.mean"] = np.asarray(state.norm_mean, dtype=np.float64)
    arrays["norm.var"] = np.asarray(state.norm_var, dtype=np.float64)
    if state.key_probe is not None:
        arrays["namm.key_probe"] = np.asarray(state.key_probe, dtype=np.float32)
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
        key_probe = np.asarray(npz["namm.key_probe"]) if "namm.key_probe" in npz.files else None
        if "namm_config" in doc:
            NAMMConfig.from_dict(doc["namm_config"])
    except KeyError as err:
        raise EvolveError(f"{where} lacks {err.args[0]!r}; it is not a complete evolution checkpoint") from None
    except CMAESError as err:
        raise EvolveError(f"{where}: {err}") from None
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        if isinstance(err, EvolveError):
            raise
        raise EvolveError(f"{where} is damaged ({describe(err)})") from None
    if doc.get("generation") != es.generation:
        raise EvolveError(f"{where} is inconsistent: generation {doc.get('generation')} vs CMA-ES {es.generation}")
    return RunState(es, doc, norm_mean.astype(np.float64), norm_var.astype(np.float64), key_probe)


def _write_checkpoint(out: Path, state: RunState) -> None:
    arrays = _state_arrays(state)
    atomic_write(out / STATE_FILE, lambda fh: np.savez(fh, **arrays))
    summary = json.loads(bytes(arrays["run_json"]).decode())
    summary["cma"].pop("rng", None)
    summary["note"] = f"informational copy; the checkpoint is {STATE_FILE}"
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def write_fitness_plot(run_dir: str | os.PathLike) -> Path | None:
    """Draw ``run_dir/fitness.png`` from the run's log (atomically); None if the
    log is empty or matplotlib (the ``[plot]`` extra) is missing."""
    from ..eval.plot import plot_fitness_curve, plots_available

    out = Path(run_dir)
    records = read_log(out)
    if not records or not plots_available():
        return None
    atomic_write(out / PLOT_FILE, lambda fh: plot_fitness_curve(records, fh))
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
    atomic_write(path, b"".join(line + b"\n" for line in kept))


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
    namm = NAMM.from_flat(es.mean, state.norm_mean, state.norm_var, state.namm_config(config), metadata=meta,
                          key_probe=state.key_probe)
    namm.save(target)
    return namm


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _note(enabled: bool, message: str) -> None:
    if enabled:
        print(f"note: {message}", file=sys.stderr, flush=True)
