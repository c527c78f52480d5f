"""The NAMM memory model: evolved weights + frozen statistics + the pipeline.

``NAMM.step`` is one eviction call of the reference for one layer:

    attention -> token_features (STFT, EMA, normalise, recency) -> bam_scores
              -> select_kept -> gather

The model never imports mlx-lm: it maps attention probabilities and carried
per-token state to kept indices and the carried state of the kept tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from .errors import NammError
from .files import atomic_path, atomic_write
from .bam import BAMOutput, BAMWeights, bam_scores
from .config import NAMMConfig
from .features import (
    RecencyTable,
    key_norm_feature,
    normalize_spectrum,
    spectral_ema,
    token_ages,
)
from .selection import gather_tokens, select_kept

WEIGHTS_FILE = "namm.safetensors"
CONFIG_FILE = "namm_config.json"


class NAMMFormatError(NammError, ValueError):
    """A NAMM folder, vector or buffer that cannot be used; the message says why."""


@dataclass
class TokenState:
    """Per-token memory carried between calls, evicted in step with the keys.

    positions: int32 ``[..., H, N]`` absolute positions (never renumbered).
    attn_tail: float32 ``[..., H, N, ctx]`` the last ``ctx`` attention samples.
    ema: float32 ``[..., H, N, n_bins]`` un-normalised spectrogram EMA.
    """

    positions: mx.array
    attn_tail: mx.array
    ema: mx.array

    def gather(self, kept: mx.array) -> "TokenState":
        return TokenState(
            positions=gather_tokens(self.positions, kept),
            attn_tail=gather_tokens(self.attn_tail, kept),
            ema=gather_tokens(self.ema, kept),
        )

    def arrays(self) -> list[mx.array]:
        return [self.positions, self.attn_tail, self.ema]


@dataclass
class TokenFeatures:
    """Everything computed for the cached tokens at one call (shapes ``[..., H, N, *]``)."""

    stft: mx.array  # [..., N, F, n_bins]
    ema: mx.array  # [..., N, n_bins] (carried state, pre-normalisation)
    normalized: mx.array  # [..., N, n_bins]
    ages: mx.array  # [..., N]
    recency: mx.array  # [..., N, recency_dim]
    embedding: mx.array  # [..., N, E]
    attn_tail: mx.array  # [..., N, ctx] to carry on
    key_norm: mx.array | None = None  # [..., N, 1] when the config reads keys


@dataclass
class StepResult:
    """Outcome of one eviction call for one layer."""

    kept: mx.array  # int32 [B, H, K] kept slot indices, ascending
    state: TokenState  # state of the kept tokens
    scores: mx.array  # [B, H, N]
    features: TokenFeatures
    bam: BAMOutput


class NAMM:
    """An evolved memory model: 4,172 BAM weights plus the 17-bin statistics."""

    def __init__(
        self,
        weights: BAMWeights,
        norm_mean: mx.array,
        norm_var: mx.array,
        config: NAMMConfig | None = None,
        norm_count: np.ndarray | None = None,
        metadata: Mapping[str, str] | None = None,
        key_probe: Any = None,
    ) -> None:
        self.config = config or NAMMConfig()
        validate(weights, norm_mean, norm_var, norm_count, self.config)
        #: ``[layers, KV heads, D/2 + 1]`` (:mod:`namm_mlx.key_probe`), or None.
        #: Unlike the BAM it is fitted to one model's keys, so it is optional
        #: and travels beside the reference weights, never inside the vector.
        self.key_probe = None if key_probe is None else _checked_key_probe(key_probe)
        self.weights = weights
        self.norm_mean = norm_mean.astype(mx.float32)
        self.norm_var = norm_var.astype(mx.float32)
        self.norm_count = None if norm_count is None else np.asarray(norm_count).astype(np.int64)
        self.metadata = dict(metadata or {})
        self._recency = RecencyTable(self.config)

    # ------------------------------------------------------------------ params
    @classmethod
    def from_flat(
        cls,
        vector: Any,
        norm_mean: Any,
        norm_var: Any,
        config: NAMMConfig | None = None,
        norm_count: Any = None,
        metadata: Mapping[str, str] | None = None,
        key_probe: Any = None,
    ) -> "NAMM":
        """Unflatten a reference parameter vector (spec §5.1 layout)."""
        config = config or NAMMConfig()
        flat = _float32(_float_values(vector, "the parameter vector")).reshape(-1)
        if flat.size != config.param_size:
            raise NAMMFormatError(
                f"a NAMM vector has {config.param_size:,} values, got {flat.size:,} "
                f"(layout: {config.layout_description()})"
            )
        tensors, offset = [], 0
        for _, shape in config.param_layout:
            size = int(np.prod(shape))
            tensors.append(mx.array(flat[offset : offset + size].reshape(shape)))
            offset += size
        mean, var = (_check_buffer(b, config.n_bins, name) for b, name in ((norm_mean, "mean"), (norm_var, "var")))
        count = None if norm_count is None else np.asarray(norm_count).reshape(-1)
        return cls(BAMWeights(*tensors), mx.array(mean), mx.array(var), config, count, metadata, key_probe)

    @classmethod
    def zeros(cls, config: NAMMConfig | None = None) -> "NAMM":
        """The CMA-ES starting point: every score is exactly 0, so nothing is evicted."""
        config = config or NAMMConfig()
        return cls.from_flat(
            np.zeros(config.param_size, np.float32),
            np.zeros(config.n_bins, np.float32),
            np.ones(config.n_bins, np.float32),
            config,
        )

    def with_config(self, **changes: Any) -> "NAMM":
        """The same weights with settings changed (``key_probe_share=0.15``).
        Only settings that leave the weights' shapes alone can change: the
        weights were fitted for those shapes."""
        config = dataclasses.replace(self.config, **changes)
        if config.param_size != self.config.param_size or config.n_bins != self.config.n_bins:
            changed = ", ".join(sorted(changes))
            raise ValueError(f"{changed}: the weights were fitted for {self.config.param_size} parameters, "
                             f"these settings need {config.param_size}")
        return NAMM(self.weights, self.norm_mean, self.norm_var, config, self.norm_count, self.metadata, self.key_probe)

    def without_key_probe(self) -> "NAMM":
        """The same NAMM without its key probe (for a model the probe was not fitted to)."""
        config = dataclasses.replace(self.config, key_probe_span=0, key_probe_share=1.0)
        return NAMM(self.weights, self.norm_mean, self.norm_var, config, self.norm_count, self.metadata)

    def to_flat(self) -> np.ndarray:
        """The flat float32 vector in the reference layout."""
        return np.concatenate([np.asarray(t, dtype=np.float32).reshape(-1) for t in self.weights.as_list()])

    def named_tensors(self) -> dict[str, mx.array]:
        """Tensors as stored in ``namm.safetensors`` (same names as the reference
        fixtures' expected conversion)."""
        names = [name for name, _ in self.config.param_layout]
        tensors = dict(zip(names, self.weights.as_list()))
        tensors["param_vector"] = mx.array(self.to_flat())
        tensors["norm.mean"] = self.norm_mean
        tensors["norm.var"] = self.norm_var
        if self.norm_count is not None:
            tensors["norm.count"] = mx.array(self.norm_count.astype(np.int64))
        if self.key_probe is not None:
            tensors["key_probe"] = self.key_probe
        return tensors

    # --------------------------------------------------------------------- io
    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write ``path/namm.safetensors`` (metadata ``format: mlx`` plus
        provenance) and ``path/namm_config.json``, each atomically."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**self.metadata, **dict(metadata or {}), "format": "mlx"}
        meta = {str(k): str(v) for k, v in meta.items()}
        with atomic_path(folder / WEIGHTS_FILE, suffix=".safetensors") as tmp:
            mx.save_safetensors(str(tmp), self.named_tensors(), metadata=meta)
        config = {**self.config.to_dict(), "param_size": self.config.param_size}
        provenance = {k: v for k, v in meta.items() if k != "format"}
        if provenance:
            config["provenance"] = provenance
        atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NAMM":
        """Load a folder written by :meth:`save` (or by ``namm convert``)."""
        folder = Path(path)
        if not folder.is_dir():
            raise NAMMFormatError(f"no NAMM folder at {folder} (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for p in (config_path, weights_path):
            if not p.is_file():
                raise NAMMFormatError(f"{folder} is not a NAMM folder: {p.name} is missing")
        try:
            config = NAMMConfig.from_dict(json.loads(config_path.read_text()))
        except (ValueError, TypeError) as err:
            raise NAMMFormatError(f"{config_path} is not a valid NAMM config: {err}") from None
        try:
            tensors, meta = mx.load(str(weights_path), return_metadata=True)
        except Exception as err:  # mlx raises RuntimeError/ValueError on corrupt files
            raise NAMMFormatError(f"{weights_path} is unreadable or corrupt ({err})") from None
        for name in ("norm.mean", "norm.var"):
            if name not in tensors:
                raise NAMMFormatError(f"{weights_path} has no {name} (the frozen normalisation buffers)")
        names = [name for name, _ in config.param_layout]
        try:
            if all(name in tensors for name in names):
                parts = [_float_values(tensors[n], n) for n in names]
                vector = np.concatenate([_float32(p).reshape(-1) for p in parts])
                if "param_vector" in tensors and not np.array_equal(
                    vector, _float_values(tensors["param_vector"], "param_vector").reshape(-1), equal_nan=True
                ):
                    raise NAMMFormatError("param_vector disagrees with the named weights")
            elif "param_vector" in tensors:
                vector = _float_values(tensors["param_vector"], "param_vector")
            else:
                raise NAMMFormatError("it holds neither the BAM weights nor a param_vector")
            count = tensors.get("norm.count")
            meta = {k: v for k, v in (meta or {}).items() if k != "format"}
            return cls.from_flat(
                vector,
                _float_values(tensors["norm.mean"], "norm.mean"),
                _float_values(tensors["norm.var"], "norm.var"),
                config,
                None if count is None else np.asarray(count),
                meta,
                tensors.get("key_probe"),
            )
        except NAMMFormatError as err:
            raise NAMMFormatError(f"{weights_path}: {err}") from None

    # --------------------------------------------------------------- pipeline
    def token_features(
        self,
        attn: mx.array,
        positions: mx.array,
        carried: TokenState | None = None,
        keys: mx.array | None = None,
    ) -> TokenFeatures:
        """Features of every cached token (spec §2).

        attn: ``[..., H, n, N]`` GQA-averaged attention of the ``n`` queries
        since the last call over all ``N`` cache slots (old kept slots first,
        then the ``n`` new ones). positions: ``[..., H, N]``. carried: state of
        the ``N - n`` old slots, or None for a new sequence. keys: ``[..., H,
        N, D]``, read only by a config with ``key_norm_input``.
        """
        n, N = attn.shape[-2], attn.shape[-1]
        n_old = 0 if carried is None else carried.ema.shape[-2]
        if n % self.config.hop:
            raise ValueError(f"a NAMM call needs a multiple of {self.config.hop} new queries, got {n}")
        if n_old + n != N:
            raise ValueError(f"cache has {N} slots but {n_old} carried + {n} new were given")
        attn = attn.astype(mx.float32)
        stft, ema, tail = spectral_ema(
            attn, None if carried is None else carried.attn_tail, None if carried is None else carried.ema, self.config
        )
        normalized = normalize_spectrum(ema, self.norm_mean, self.norm_var, self.config.norm_eps)
        ages = token_ages(positions, self.config.start_recency_from)
        recency = self._recency(ages)
        parts = [recency, normalized]
        key_norm = None
        if self.config.key_norm_input:
            if keys is None or keys.shape[-2] != N:
                raise ValueError(f"this NAMM reads key norms: pass the keys of all {N} slots")
            key_norm = key_norm_feature(keys)
            parts.append(key_norm)
        embedding = mx.concatenate(parts, axis=-1)
        return TokenFeatures(stft, ema, normalized, ages, recency, embedding, tail, key_norm)

    def score(
        self,
        attn: mx.array,
        positions: mx.array,
        carried: TokenState | None = None,
        keys: mx.array | None = None,
    ) -> tuple[mx.array, TokenState, TokenFeatures, BAMOutput]:
        """Scores for every slot plus the (un-gathered) state to carry on."""
        features = self.token_features(attn, positions, carried, keys)
        bam = bam_scores(features.embedding, self.weights, self.config)
        state = TokenState(positions.astype(mx.int32), features.attn_tail, features.ema)
        return bam.scores, state, features, bam

    def step(
        self,
        attn: mx.array,
        positions: mx.array,
        carried: TokenState | None = None,
        max_keep: int | None = None,
        keys: mx.array | None = None,
    ) -> StepResult:
        """One reference eviction call for one layer (spec §1.5).

        attn: ``[B, H, n, N]``; positions ``[B, H, N]``. Returns the kept
        indices ``[B, H, K]`` and the kept tokens' state; the caller gathers
        its keys and values with ``gather_tokens(keys, result.kept)``.
        """
        scores, state, features, bam = self.score(attn, positions, carried, keys)
        kept = select_kept(scores, self.config.threshold, max_keep)
        return StepResult(kept, state.gather(kept), scores, features, bam)


def _checked_key_probe(probe: Any) -> mx.array:
    """A ``[layers, heads, D/2 + 1]`` float array of finite values, or a clear error."""
    values = _float_values(probe, "key_probe")
    if values.ndim != 3 or min(values.shape) < 1 or values.shape[-1] < 2:
        raise NAMMFormatError(f"key_probe must be [layers, heads, D/2 + 1], got shape {list(values.shape)}")
    _require_finite(values, "key_probe")
    return mx.array(_float32(values))


def validate(
    weights: BAMWeights, norm_mean: Any, norm_var: Any, norm_count: Any, config: NAMMConfig
) -> None:
    """Refuse parameters a NAMM cannot score with, naming the tensor and the bad value.

    Every way a NAMM is built (folder, hub, prompt cache, ``--init-from``,
    conversion) ends in ``NAMM.__init__``, which calls this. A NaN or inf
    weight, or a negative variance (NaN after the square root), makes every
    score NaN, and NaN never passes the threshold: the first step would evict
    the whole cache without a word. Integer tensors mean a file written by
    something else (or quantised), so they are refused rather than widened.
    A variance of exactly 0 is allowed: the normalisation floors the standard
    deviation at ``norm_eps``.
    """
    for (name, shape), tensor in zip(config.param_layout, weights.as_list(), strict=True):
        values = _float_values(tensor, name)
        if tuple(values.shape) != tuple(shape):
            raise NAMMFormatError(f"{name} has shape {list(values.shape)}, expected {list(shape)}")
        _require_finite(values, name)
    for name, buffer in (("norm.mean", norm_mean), ("norm.var", norm_var)):
        values = _float_values(buffer, name).reshape(-1)
        if values.size != config.n_bins:
            raise NAMMFormatError(f"{name} has {values.size} values, expected {config.n_bins}")
        _require_finite(values, name)
    variances = _float_values(norm_var, "norm.var").reshape(-1)
    if (variances < 0).any():
        i = int(np.argmax(variances < 0))
        raise NAMMFormatError(f"norm.var holds a negative variance {variances[i]:g} (bin {i}); variances must be >= 0")
    if norm_count is not None:
        counts = np.asarray(norm_count)
        if counts.dtype.kind not in "iu":
            raise NAMMFormatError(f"norm.count has dtype {counts.dtype}, expected integers")
        if (counts < 0).any():
            raise NAMMFormatError(f"norm.count holds a negative count {int(counts.min())}")


def _float_values(array: Any, name: str) -> np.ndarray:
    """``array`` as a floating-point numpy array (mlx bfloat16 widened); integers,
    booleans and objects are refused so nothing is silently truncated or cast."""
    if array is None:
        raise NAMMFormatError(f"{name} is missing")
    if isinstance(array, mx.array):
        if not mx.issubdtype(array.dtype, mx.floating):
            raise NAMMFormatError(f"{name} has dtype {array.dtype}, expected floating-point numbers")
        return np.asarray(array.astype(mx.float32) if array.dtype == mx.bfloat16 else array)
    values = np.asarray(array)
    if values.dtype.kind != "f":
        raise NAMMFormatError(f"{name} has dtype {values.dtype}, expected floating-point numbers")
    return values


def _require_finite(values: np.ndarray, name: str) -> None:
    """float32 is what the pipeline computes in: a float64 value past its range is inf too."""
    flat = values.reshape(-1)
    bad = ~np.isfinite(_float32(flat))
    if bad.any():
        i = int(np.argmax(bad))
        raise NAMMFormatError(f"{name} holds {float(flat[i])!r} at index {i}; every value must be a finite float32")


def _float32(values: np.ndarray) -> np.ndarray:
    """Cast without numpy's overflow warning (the overflow itself is reported as inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float32)


def _check_buffer(buffer: Any, n_bins: int, name: str) -> np.ndarray:
    if buffer is None:
        raise NAMMFormatError(f"the normalisation {name} buffer is missing")
    values = _float32(_float_values(buffer, f"norm.{name}")).reshape(-1)
    if values.size != n_bins:
        raise NAMMFormatError(f"the normalisation {name} has {values.size} values, expected {n_bins}")
    return values
