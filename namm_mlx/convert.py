"""Conversion between the reference trainer's files and a ``NAMM.load`` folder.

``convert_checkpoint`` turns what the PyTorch trainer (SakanaAI/evo-memory)
leaves behind -- a ``ckpt.pt`` / ``latest.pt`` / ``iter_N.pt``, or a bare flat
vector as ``.npy`` / ``.safetensors`` -- into the folder ``NAMM.load`` reads,
recording where it came from so a deployed NAMM can be traced back to the run
and member that produced it. ``export_checkpoint`` goes the other way so a
NAMM tuned or evolved here can be handed to the reference trainer's
``init_from``.

Nothing here needs torch or runs a pickle's code: checkpoints go through the
allow-listed reader of :mod:`namm_mlx.checkpoint`, ``.npy``/``.npz`` are read
with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from .errors import NammError, describe
from .checkpoint import CheckpointError, read_reference_checkpoint, write_reference_checkpoint
from .config import NAMMConfig
from .namm import CONFIG_FILE, NAMM, WEIGHTS_FILE

__all__ = [
    "CONVERSION_ERRORS",
    "MEMBERS",
    "ConversionError",
    "ExportResult",
    "FlatSource",
    "convert_checkpoint",
    "export_checkpoint",
    "read_source",
]

#: Checkpoint members that can be converted: the CMA-ES mean is what the
#: reference deploys (``prefer_mean_to_best=true``), ``best`` is the best sampled member.
MEMBERS = ("mean", "best")
MISSING_NORM = "missing normalisation buffers: pass --norm FILE with norm.mean and norm.var"

# Names under which normalisation buffers are accepted (first match wins): our own
# folder/expected-conversion names, then the bare names a hand-made .npz would use.
_NORM_KEYS = {
    "mean": ("norm.mean", "mean"),
    "var": ("norm.var", "var"),
    "count": ("norm.count", "count"),
}


class ConversionError(NammError, ValueError):
    """Input or output of a conversion that cannot be used; the message is one line for users."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class FlatSource:
    """What a source file yields: one member's vector with the buffers that belong to it."""

    vector: np.ndarray
    norm_mean: np.ndarray
    norm_var: np.ndarray
    norm_count: np.ndarray | None
    provenance: dict[str, str] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What ``export_checkpoint`` wrote (for the CLI's summary line)."""

    path: Path
    iteration: int
    best_val_loss: float | None


# ------------------------------------------------------------------------- reading
def converter_name() -> str:
    """``namm-mlx <version>`` for the provenance record (imported lazily: the package
    ``__init__`` pulls in mlx-lm and may itself import this module one day)."""
    from . import __version__

    return f"namm-mlx {__version__}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed (checkpoints with dense covariances are ~200 MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ConversionError(f"{path} is a directory; pass the {what} file itself")
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float/int numpy arrays (bf16/fp16 widened)."""
    try:
        tensors = mx.load(str(path), format="safetensors")
    except Exception as err:  # mlx raises RuntimeError/ValueError on damaged files
        raise ConversionError(
            f"{path.name} is not a readable .safetensors file (truncated or corrupt?): {describe(err)}"
        ) from None
    out = {}
    for name, value in tensors.items():
        if value.dtype in (mx.bfloat16, mx.float16):
            value = value.astype(mx.float32)
        out[name] = np.asarray(value)
    return out


def _numpy_error(path: Path, what: str, err: BaseException) -> ConversionError:
    """One line for a numpy file numpy cannot read; pickled content is named as refused."""
    if isinstance(err, ValueError) and "allow_pickle" in str(err):
        return ConversionError(f"refused to load {path.name}: it holds pickled objects, not numbers")
    return ConversionError(f"{path.name} is not a readable {what} (truncated or corrupt?): {describe(err)}")


#: Largest array a conversion input may declare (a flat NAMM vector is 17 kB; a
#: --norm buffer less): anything bigger is refused before it is inflated or read.
MAX_INPUT_BYTES = 64 << 20


def _check_npz_members(path: Path) -> None:
    """Refuse an .npz (a zip) whose members declare more than :data:`MAX_INPUT_BYTES`
    before numpy inflates them."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > MAX_INPUT_BYTES:
                    raise ConversionError(
                        f"refused to read {path.name}: member {info.filename} declares {info.file_size:,} bytes, "
                        f"more than a NAMM buffer ever needs ({MAX_INPUT_BYTES:,}); the file is corrupt or a zip bomb"
                    )
    except zipfile.BadZipFile:
        return  # numpy names what is wrong


def _check_npy_size(path: Path) -> None:
    """Refuse an .npy whose header declares more data than the file holds (numpy
    would allocate the declared size first) or more than :data:`MAX_INPUT_BYTES`."""
    try:
        with open(path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
            left = os.fstat(fh.fileno()).st_size - fh.tell()
    except Exception:
        return  # numpy names what is wrong
    declared = math.prod(shape) * dtype.itemsize
    if declared > min(left, MAX_INPUT_BYTES):
        raise ConversionError(
            f"refused to read {path.name}: its header declares {declared:,} bytes of data, the file holds {left:,}"
            f" (and a NAMM vector needs under {MAX_INPUT_BYTES:,}); the file is corrupt"
        )


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Named arrays of an .npz, never unpickling anything."""
    _check_npz_members(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ConversionError(f"{path.name} is a single .npy array, not an archive of named buffers")
        with archive:
            return {name: archive[name] for name in archive.files}
    except ConversionError:
        raise
    except Exception as err:  # ValueError, BadZipFile, EOFError, OSError ...
        raise _numpy_error(path, ".npz archive", err) from None


def _load_npy(path: Path) -> np.ndarray:
    """A flat vector from an .npy, never unpickling anything."""
    _check_npy_size(path)
    try:
        value = np.load(path, allow_pickle=False)
    except Exception as err:
        raise _numpy_error(path, ".npy array", err) from None
    if not isinstance(value, np.ndarray):
        raise ConversionError(f"{path.name} is an archive of several arrays; pass a single flat vector as .npy")
    return value


def _pick(tensors: Mapping[str, np.ndarray], kind: str) -> np.ndarray | None:
    for name in _NORM_KEYS[kind]:
        if name in tensors:
            return np.asarray(tensors[name])
    return None


def _read_norm_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(mean, var, count)`` from a ``--norm`` file (.safetensors or .npz)."""
    _require_file(path, "normalisation file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors = _load_safetensors(path)
    elif suffix == ".npz":
        tensors = _load_npz(path)
    else:
        raise ConversionError(
            f"--norm {path.name}: expected a .safetensors or .npz file holding norm.mean and norm.var"
        )
    mean, var = _pick(tensors, "mean"), _pick(tensors, "var")
    if mean is None or var is None:
        found = ", ".join(sorted(tensors)) or "nothing"
        raise ConversionError(f"--norm {path.name} has no norm.mean/norm.var (or mean/var); found {found}")
    return mean, var, _pick(tensors, "count")


def _vector_from_tensors(tensors: Mapping[str, np.ndarray], source: str, config: NAMMConfig) -> np.ndarray:
    """``param_vector``, or the six named weights concatenated in layout order."""
    names = [name for name, _ in config.param_layout]
    if "param_vector" in tensors:
        return np.asarray(tensors["param_vector"])
    if all(name in tensors for name in names):
        parts = []
        for name, shape in config.param_layout:
            value = np.asarray(tensors[name])
            if value.size != math.prod(shape):
                raise ConversionError(
                    f"{source}: {name} has {value.size:,} values, expected {'x'.join(map(str, shape))} "
                    f"(layout: {config.layout_description()})"
                )
            parts.append(value.reshape(-1))
        return np.concatenate(parts)
    raise ConversionError(
        f"{source} holds neither 'param_vector' nor the BAM weights ({', '.join(names)}); "
        f"found {', '.join(sorted(tensors)) or 'nothing'}"
    )


def _checked_vector(vector: np.ndarray, source: str, config: NAMMConfig) -> np.ndarray:
    """A finite, numeric vector of ``config.param_size`` values (any shape)."""
    if vector.dtype.kind not in "fiu":
        raise ConversionError(f"{source}: the parameter vector has dtype {vector.dtype}, expected numbers")
    if vector.size != config.param_size:
        raise ConversionError(
            f"{source}: a NAMM vector has {config.param_size:,} values, got {vector.size:,} "
            f"(shape {list(vector.shape)}; layout: {config.layout_description()})"
        )
    flat = vector.reshape(-1).astype(np.float32)
    if not np.isfinite(flat).all():
        raise ConversionError(f"{source}: the parameter vector contains NaN or inf")
    return flat


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix == ".safetensors":
        return "safetensors"
    return "checkpoint"


def read_source(
    src: str | os.PathLike,
    member: str = "mean",
    norm: str | os.PathLike | None = None,
    config: NAMMConfig | None = None,
) -> FlatSource:
    """Read one member's vector and normalisation buffers from any supported source.

    ``src`` is a reference trainer checkpoint (any other suffix, typically ``.pt``),
    a flat vector as ``.npy`` (buffers must come from ``norm``) or a ``.safetensors``
    with ``param_vector`` (or the six named weights) and ``norm.mean``/``norm.var``.
    ``norm`` overrides the buffers of a ``.safetensors``; for a checkpoint it is
    refused, because its buffers belong to the member and must not be mixed.
    """
    config = config or NAMMConfig()
    path = Path(src)
    kind = _kind(path)
    _require_file(path, "checkpoint" if kind == "checkpoint" else "input")
    if member not in MEMBERS:
        raise ConversionError(f"unknown member {member!r}; choose 'mean' (deployed parameters) or 'best'")
    provenance = {"source": path.name, "source_sha256": sha256_file(path), "converter": converter_name()}

    if kind == "checkpoint":
        if norm is not None:
            raise ConversionError(
                "--norm is only for flat vectors: a checkpoint carries the normalisation buffers of each member"
            )
        ckpt = read_reference_checkpoint(path)
        vector, norm_mean, norm_var = ckpt.member(member)
        count = ckpt.best_norm_count if member == "best" and ckpt.best_norm_mean is not None else ckpt.norm_count
        provenance.update(source_format="evo-memory trainer checkpoint", member=member)
        if ckpt.iter_num is not None:
            provenance["iteration"] = str(ckpt.iter_num)
        if ckpt.best_val_loss is not None:
            provenance["best_val_loss"] = repr(float(ckpt.best_val_loss))
        return FlatSource(_checked_vector(vector, path.name, config), norm_mean, norm_var, count, provenance)

    if member != "mean":
        raise ConversionError(
            f"--member {member} applies to trainer checkpoints; {path.name} holds a single flat vector"
        )
    if kind == "npy":
        vector = _load_npy(path)
        norm_mean = norm_var = count = None
        provenance["source_format"] = "flat vector (.npy)"
    else:
        tensors = _load_safetensors(path)
        vector = _vector_from_tensors(tensors, path.name, config)
        norm_mean, norm_var, count = _pick(tensors, "mean"), _pick(tensors, "var"), _pick(tensors, "count")
        provenance["source_format"] = "flat vector (.safetensors)"
    vector = _checked_vector(vector, path.name, config)
    if norm is not None:
        norm_path = Path(norm)
        norm_mean, norm_var, count = _read_norm_file(norm_path)
        provenance["norm_source"] = norm_path.name
        provenance["norm_sha256"] = sha256_file(norm_path)
    if norm_mean is None or norm_var is None:
        raise ConversionError(MISSING_NORM)
    return FlatSource(vector, norm_mean, norm_var, count, provenance)


# ------------------------------------------------------------------------- writing
def is_namm_folder(folder: Path) -> bool:
    """A folder written by ``NAMM.save`` (either of its files present)."""
    return (folder / WEIGHTS_FILE).is_file() or (folder / CONFIG_FILE).is_file()


def check_output_dir(out_dir: Path) -> None:
    """Refuse to write into a file or into a non-empty folder that is not a NAMM:
    ``-o .`` or a typo must not scatter files into someone's project. Replacing
    an earlier conversion is fine."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_namm_folder(out_dir):
        raise ConversionError(
            f"output folder {out_dir} is not empty and holds no NAMM ({WEIGHTS_FILE}); "
            "choose a new or empty folder"
        )


def _finite_norm(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "fiu" or not np.isfinite(array.astype(np.float64)).all():
        raise ConversionError(f"the normalisation {name} buffer must hold finite numbers")
    return array


def convert_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    member: str = "mean",
    norm: str | os.PathLike | None = None,
    config: NAMMConfig | None = None,
) -> NAMM:
    """Convert a reference checkpoint (or flat vector + buffers) into a ``NAMM.load`` folder.

    Everything is read and validated before anything is written, so a bad input
    never leaves a half-made folder. The folder's metadata records the source
    file name and sha256, the member, iteration and best validation score (when
    the checkpoint has them) and the converter version.
    """
    out = Path(out_dir)
    source = read_source(src, member, norm, config)
    check_output_dir(out)
    namm = NAMM.from_flat(
        source.vector,
        _finite_norm(source.norm_mean, "mean"),
        _finite_norm(source.norm_var, "var"),
        config,
        norm_count=source.norm_count,
    )
    if (np.asarray(namm.norm_var) < 0).any():
        raise ConversionError("the normalisation var buffer has negative variances")
    try:
        namm.save(out, metadata=source.provenance)
    except OSError as err:
        raise ConversionError(f"cannot write {out}: {describe(err)}") from None
    namm.metadata = dict(source.provenance)
    return namm


def export_checkpoint(
    namm_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    iter_num: int | None = None,
    dense_covariance: bool = False,
    pop_size: int = 32,
) -> ExportResult:
    """Write a NAMM folder as a reference trainer checkpoint its ``init_from`` accepts.

    The iteration defaults to the one recorded when the folder was converted, so
    a round trip keeps the training clock; ``iter_num`` overrides it. The best
    validation score is carried over when recorded. ``dense_covariance`` writes
    the identity covariance needed to resume CMA-ES (~66 MiB) instead of the
    small placeholders (see :func:`write_reference_checkpoint`).
    """
    namm = NAMM.load(namm_dir)
    if namm.config.key_norm_input:
        raise ConversionError(
            f"{namm_dir}: this NAMM reads key norms (key_norm_input), an input the reference trainer does not have"
        )
    if namm.config.bam_window:
        raise ConversionError(
            f"{namm_dir}: this NAMM's BAM attends over a window of {namm.config.bam_window} newer tokens "
            "(bam_window); the reference BAM attends over all of them, so its scores would change"
        )
    if namm.config.newest_query_weight:
        raise ConversionError(
            f"{namm_dir}: this NAMM mixes the newest query's attention into its scores "
            f"(newest_query_weight {namm.config.newest_query_weight}), which the reference does not"
        )
    if namm.key_probe is not None:
        raise ConversionError(
            f"{namm_dir}: this NAMM has a key probe, which the reference format cannot hold "
            "(export the NAMM it was fitted onto, its --namm)"
        )
    out = Path(out_path)
    if out.is_dir():
        raise ConversionError(f"output {out} is a directory; pass a file name such as {out / 'ckpt.pt'}")
    meta = namm.metadata
    if iter_num is None:
        try:
            iter_num = int(meta.get("iteration", 0))
        except ValueError:
            raise ConversionError(
                f"{namm_dir}: recorded iteration {meta['iteration']!r} is not a number; pass --iter N"
            ) from None
    best_val_loss = None
    if "best_val_loss" in meta:
        try:
            best_val_loss = float(meta["best_val_loss"])
        except ValueError:
            best_val_loss = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConversionError(f"cannot create {out.parent}: {describe(err)}") from None
    write_reference_checkpoint(
        out,
        namm.to_flat(),
        np.asarray(namm.norm_mean),
        np.asarray(namm.norm_var),
        norm_count=namm.norm_count,
        iter_num=iter_num,
        best_val_loss=best_val_loss,
        pop_size=pop_size,
        dense_covariance=dense_covariance,
    )
    return ExportResult(out, iter_num, best_val_loss)


#: Every error type a conversion raises on bad input (for the CLI to show as one line).
CONVERSION_ERRORS = (ConversionError, CheckpointError)
