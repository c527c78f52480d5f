"""The SakanaAI evo-memory (NAMM) trainer checkpoint <-> a NAMM's vector and buffers.

The original trainer (``memory_trainer._save_ckpt``) stores ``ckpt.pt`` /
``latest.pt`` / ``iter_N.pt`` with ``torch.save``: ``{"evolution_state":
CMA_ES.state_dict(), "iter_num", "best_val_loss"}``. Reading takes the CMA-ES
mean (the deployed parameters) and the normalisation buffers out of it;
writing builds a state dict the reference trainer's ``init_from`` accepts
(same keys, shapes and dtypes), with the genuine CMA-ES constants.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..cma_es import DEFAULT_SIGMA, cma_defaults
from ..errors import describe
from .errors import CheckpointError
from .reader import load_torch_pickle
from .writer import _broadcast_tensor, _dense_storage, _dense_tensor, _OutStorage, _OutTensor, _save_torch_zip

__all__ = [
    "NORM_BINS",
    "PARAM_SIZE",
    "ReferenceCheckpoint",
    "read_reference_checkpoint",
    "write_reference_checkpoint",
]

PARAM_SIZE = 4172
"""Length of the released NAMM (BAM) parameter vector."""
PARAM_LAYOUT = "qkv 25x96+96, out 32x50+50, readout 25x1+1"
NORM_BINS = 17
"""Number of normalised spectrogram bins (n_fft 32, one-sided)."""

STORED_PREFIX = "stored_buffers_to_save."
BEST_STORED_PREFIX = "best_stored_buffers_to_save."
# Sorted by name, as the reference state dict stores them (mean, num, var).
BUFFER_NAMES = (
    "token_embedding_0_online_new_output_mean",
    "token_embedding_0_online_new_output_num",
    "token_embedding_0_online_new_output_var",
    "token_embedding_0_output_mean",
    "token_embedding_0_output_num",
    "token_embedding_0_output_var",
)
_NORM_MEAN = "token_embedding_0_output_mean"
_NORM_VAR = "token_embedding_0_output_var"
_NORM_COUNT = "token_embedding_0_output_num"
_BUFFER_SHAPE = (1, 1, 1, NORM_BINS)


@dataclass
class ReferenceCheckpoint:
    """What a NAMM trainer checkpoint holds, as numpy.

    ``mean`` is the CMA-ES mean, i.e. the deployed parameters (``prefer_mean_to_best``);
    ``norm_*`` are the frozen spectrogram normalisation statistics the evaluation uses
    (``stored_buffers_to_save.token_embedding_0_output_*``, flattened to 17 bins)."""

    mean: np.ndarray
    best_member: np.ndarray | None
    norm_mean: np.ndarray
    norm_var: np.ndarray
    norm_count: np.ndarray | None
    best_norm_mean: np.ndarray | None
    best_norm_var: np.ndarray | None
    best_norm_count: np.ndarray | None
    iter_num: int | None
    best_val_loss: float | None
    evolution_state: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def member(self, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(vector, norm_mean, norm_var)`` of one member, with the buffers that belong to it.

        ``"mean"``: the CMA-ES mean with ``stored_buffers_to_save`` (what the reference
        evaluates). ``"best"``: ``best_member`` with ``best_stored_buffers_to_save``, falling
        back to the stored buffers when the file has no ``best_`` copies."""
        if which == "mean":
            return self.mean, self.norm_mean, self.norm_var
        if which == "best":
            if self.best_member is None:
                raise CheckpointError("checkpoint has no 'best_member'; use the CMA-ES mean (member 'mean') instead")
            if self.best_norm_mean is not None and self.best_norm_var is not None:
                return self.best_member, self.best_norm_mean, self.best_norm_var
            return self.best_member, self.norm_mean, self.norm_var
        raise CheckpointError(f"unknown checkpoint member {which!r}; choose 'mean' (deployed parameters) or 'best'")


def _param_vector(state: Mapping[str, Any], key: str, source: str, required: bool) -> np.ndarray | None:
    """A [P] float32 parameter vector from the evolution state, validated."""
    value = state.get(key)
    if value is None:
        if required:
            raise CheckpointError(
                f"{source} has no evolution_state['{key}']; it is not a NAMM CMA-ES trainer checkpoint"
            )
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise CheckpointError(f"{source}: evolution_state['{key}'] is not a numeric tensor")
    if value.size != PARAM_SIZE:
        raise CheckpointError(
            f"{source}: evolution_state['{key}'] has {value.size:,} parameters, expected {PARAM_SIZE:,} "
            f"({PARAM_LAYOUT}); this checkpoint is for a different NAMM architecture, which namm_mlx does not support"
        )
    vector = value.reshape(-1).astype(np.float32)
    if not np.isfinite(vector).all():
        raise CheckpointError(f"{source}: evolution_state['{key}'] contains NaN or inf; the training run diverged")
    return vector


def _norm_buffer(
    state: Mapping[str, Any], prefix: str, name: str, source: str, required: bool, integer: bool = False
) -> np.ndarray | None:
    """One 17-bin normalisation buffer (stored as [1,1,1,17]), flattened and validated."""
    key = prefix + name
    value = state.get(key)
    if value is None:
        if required:
            raise CheckpointError(
                f"{source} has no normalisation statistics evolution_state['{key}']; it is not a checkpoint of the "
                "released NAMM (spectrogram embedding with online normalisation)"
            )
        return None
    if not isinstance(value, np.ndarray) or value.size != NORM_BINS or value.dtype.kind not in "fiu":
        shape = getattr(value, "shape", type(value).__name__)
        raise CheckpointError(f"{source}: evolution_state['{key}'] should hold {NORM_BINS} numbers, found {shape}")
    flat = value.reshape(-1)
    if integer:
        return flat.astype(np.int64)
    flat = flat.astype(np.float32)
    if not np.isfinite(flat).all():
        raise CheckpointError(f"{source}: evolution_state['{key}'] contains NaN or inf")
    if name == _NORM_VAR and (flat < 0).any():
        raise CheckpointError(f"{source}: evolution_state['{key}'] has negative variances; the file is corrupt")
    return flat


def _as_int(value: object) -> int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    return None


def read_reference_checkpoint(path: str | os.PathLike[str]) -> ReferenceCheckpoint:
    """Read ``ckpt.pt`` / ``latest.pt`` / ``iter_N.pt`` of the evo-memory NAMM trainer.

    Raises :class:`CheckpointError` (one line) for a missing, damaged or malicious file and
    for a file that is not a checkpoint of the released 4,172-parameter NAMM."""
    source = Path(path).name
    top = load_torch_pickle(path)
    if not isinstance(top, Mapping) or "evolution_state" not in top:
        raise CheckpointError(
            f"{source} has no 'evolution_state'; it is not a NAMM trainer checkpoint "
            "(expected ckpt.pt, latest.pt or iter_N.pt written by evo-memory's memory_trainer)"
        )
    state = top["evolution_state"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: 'evolution_state' is not a state dict; the file is not a NAMM checkpoint")
    arrays = collections.OrderedDict((k, v) for k, v in state.items() if isinstance(v, np.ndarray))
    return ReferenceCheckpoint(
        mean=_param_vector(state, "mean", source, required=True),
        best_member=_param_vector(state, "best_member", source, required=False),
        norm_mean=_norm_buffer(state, STORED_PREFIX, _NORM_MEAN, source, required=True),
        norm_var=_norm_buffer(state, STORED_PREFIX, _NORM_VAR, source, required=True),
        norm_count=_norm_buffer(state, STORED_PREFIX, _NORM_COUNT, source, required=False, integer=True),
        best_norm_mean=_norm_buffer(state, BEST_STORED_PREFIX, _NORM_MEAN, source, required=False),
        best_norm_var=_norm_buffer(state, BEST_STORED_PREFIX, _NORM_VAR, source, required=False),
        best_norm_count=_norm_buffer(state, BEST_STORED_PREFIX, _NORM_COUNT, source, required=False, integer=True),
        iter_num=_as_int(top.get("iter_num")),
        best_val_loss=_as_float(top.get("best_val_loss")),
        evolution_state=arrays,
    )


def _checked_array(value: object, what: str, size: int, size_text: str) -> np.ndarray:
    """A finite float array of ``size`` elements (any shape), or a CheckpointError."""
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise CheckpointError(f"{what} is not an array: {describe(exc)}") from exc
    if array.dtype.kind not in "fiu":
        raise CheckpointError(f"{what} must be numeric, got dtype {array.dtype}")
    if array.size != size:
        raise CheckpointError(f"{what} has {array.size:,} values, expected {size_text}")
    array = array.reshape(-1).astype(np.float64)
    if not np.isfinite(array).all():
        raise CheckpointError(f"{what} contains NaN or inf")
    return array


def _scalar_tensor(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def write_reference_checkpoint(
    path: str | os.PathLike[str],
    vector: object,
    norm_mean: object,
    norm_var: object,
    norm_count: object = None,
    iter_num: int = 0,
    best_val_loss: float | None = None,
    pop_size: int = 32,
    *,
    dense_covariance: bool = False,
) -> None:
    """Write ``vector`` + normalisation statistics as an evo-memory trainer checkpoint.

    The result has the reference ``ckpt.pt`` layout ({``evolution_state``: OrderedDict in
    ``CMA_ES.state_dict()`` order, ``iter_num``: int, ``best_val_loss``: float}) and loads
    with ``torch.load`` (``weights_only=True`` too). ``mean`` and ``best_member`` are the
    vector; ``mu_eff``/``weights``/``weights_truncated`` are the genuine CMA-ES constants
    for ``pop_size`` (elite ratio 0.5); ``sigma`` is the initial 0.065; ``g`` is
    ``iter_num``; both evolution paths are zero; ``sample_D`` is ones; ``x`` is every row
    the vector and ``y`` zeros, written as stride-0 views (the reference overwrites
    ``x``, ``y`` and the ``sample_*`` tensors at its next ``ask``).

    Covariance: with ``dense_covariance=True`` ``C``, ``sample_C`` and ``sample_B`` are the
    identity (the reference's initial ``C``; with n = 4172 its learning rates are ~1e-7, so
    a trained ``C`` stays close to it), all three views of ONE 66 MiB storage (file
    ~66 MiB). That file can be resumed with the reference's ``init_from``. By default they
    are zero [P, P] placeholders over a 1-element storage (stride (0, 0)), like the
    reference fixtures: ``init_from`` still loads them (same keys, shapes, dtypes), but the
    reference would copy the zero ``C`` into its state, its next ``ask`` clamps the zero
    eigenvalues to 1e-20 and samples the whole population at the mean, so the search does
    not move. Use the default for deployment/interchange; use ``dense_covariance=True``
    to continue training with the reference.

    ``best_val_loss`` is stored as a Python float. The original pickles a numpy.float64,
    which ``torch.load(weights_only=True)`` (the default since torch 2.6, also inside the
    reference's own ``_load_ckpt``) rejects; the reference never reads the value back when
    resuming (only ``evolution_state`` and ``iter_num``), so nothing is lost.
    ``norm_count`` defaults to zeros (unknown); the reference freezes the statistics right
    after ``init_from``, so the count is informational. The file is written atomically."""
    vec = _checked_array(vector, "parameter vector", PARAM_SIZE, f"{PARAM_SIZE:,} ({PARAM_LAYOUT})")
    mean = _checked_array(norm_mean, "norm_mean", NORM_BINS, f"{NORM_BINS} spectrogram bins")
    var = _checked_array(norm_var, "norm_var", NORM_BINS, f"{NORM_BINS} spectrogram bins")
    if (var < 0).any():
        raise CheckpointError("norm_var has negative variances")
    count = np.zeros(NORM_BINS) if norm_count is None else _checked_array(norm_count, "norm_count", NORM_BINS, "17")
    if (count < 0).any() or (count != np.round(count)).any():
        raise CheckpointError("norm_count must hold non-negative whole numbers")
    if not isinstance(iter_num, (int, np.integer)) or isinstance(iter_num, bool) or iter_num < 0:
        raise CheckpointError(f"iter_num must be a non-negative int, got {iter_num!r}")
    if not isinstance(pop_size, (int, np.integer)) or isinstance(pop_size, bool) or pop_size < 2:
        raise CheckpointError(f"pop_size must be an int >= 2, got {pop_size!r}")
    if best_val_loss is not None:
        if _as_float(best_val_loss) is None or not math.isfinite(float(best_val_loss)):
            raise CheckpointError(f"best_val_loss must be a finite number or None, got {best_val_loss!r}")
        best_val_loss = float(best_val_loss)
    state = _evolution_state(
        vec.astype(np.float32),
        mean.astype(np.float32),
        var.astype(np.float32),
        count.astype(np.int64),
        int(iter_num),
        best_val_loss,
        int(pop_size),
        dense_covariance,
    )
    _save_torch_zip(path, {"evolution_state": state, "iter_num": int(iter_num), "best_val_loss": best_val_loss})


def _identity_storage(n: int) -> _OutStorage:
    """An n x n float32 identity, streamed in row blocks to bound memory."""

    def write(out: IO[bytes]) -> None:
        block = 256
        for start in range(0, n, block):
            rows = min(block, n - start)
            chunk = np.zeros((rows, n), dtype="<f4")
            chunk[np.arange(rows), start + np.arange(rows)] = 1.0
            out.write(chunk.tobytes())

    return _OutStorage("FloatStorage", n * n, 4, write)


def _evolution_state(
    vec: np.ndarray,
    norm_mean: np.ndarray,
    norm_var: np.ndarray,
    norm_count: np.ndarray,
    iter_num: int,
    best_val_loss: float | None,
    pop_size: int,
    dense_covariance: bool,
) -> collections.OrderedDict:
    """The CMA_ES state dict in the reference's key order (module tensors, then buffers)."""
    p = PARAM_SIZE
    cma = cma_defaults(pop_size, PARAM_SIZE)
    best_fitness = best_val_loss if best_val_loss is not None else -float(np.finfo(np.float32).max)

    def zeros_placeholder(shape: tuple[int, ...]) -> _OutTensor:
        return _broadcast_tensor(_dense_storage(np.zeros(1, np.float32)), shape, (0,) * len(shape))

    if dense_covariance:
        identity = _identity_storage(p)
        cov = [_OutTensor(identity, (p, p), (p, 1)) for _ in range(3)]
    else:
        cov = [zeros_placeholder((p, p)) for _ in range(3)]
    state: collections.OrderedDict = collections.OrderedDict()
    state["mu_eff"] = _scalar_tensor(cma.mu_eff)
    state["weights"] = cma.weights
    state["weights_truncated"] = cma.weights_truncated
    state["g"] = _scalar_tensor(float(iter_num))
    state["best_member"] = vec.copy()
    state["best_fitness"] = _scalar_tensor(best_fitness)
    state["evo_path_c"] = np.zeros(p, np.float32)
    state["evo_path_sigma"] = np.zeros(p, np.float32)
    state["mean"] = vec.copy()
    state["sigma"] = _scalar_tensor(DEFAULT_SIGMA)
    state["C"], state["sample_C"], state["sample_B"] = cov
    state["sample_D"] = np.ones(p, np.float32)
    state["x"] = _broadcast_tensor(_dense_storage(vec), (pop_size, p), (0, 1))
    state["y"] = zeros_placeholder((pop_size, p))
    values = {
        "token_embedding_0_online_new_output_mean": np.zeros(NORM_BINS, np.float32),
        "token_embedding_0_online_new_output_num": np.zeros(NORM_BINS, np.int64),
        "token_embedding_0_online_new_output_var": np.zeros(NORM_BINS, np.float32),
        _NORM_MEAN: norm_mean,
        _NORM_COUNT: norm_count,
        _NORM_VAR: norm_var,
    }
    # The best_ copies share the stored_ storages, exactly as in the reference files.
    buffers = {name: _dense_tensor(values[name].reshape(_BUFFER_SHAPE)) for name in BUFFER_NAMES}
    for prefix in (STORED_PREFIX, BEST_STORED_PREFIX):
        for name in BUFFER_NAMES:
            state[prefix + name] = buffers[name]
    return state
