"""Token storage for the evicting cache: a float array or mlx's quantised triple.

With ``--kv-bits`` the kept keys and values are stored as mlx-lm's
``QuantizedKVCache`` stores them: ``mx.quantize`` groups of ``group_size``
along the head dimension, i.e. a ``(packed uint32, scales, biases)`` triple
whose parts all have the token axis at position 2. Groups never straddle
tokens, so appending, slicing and the per-head eviction gather work part by
part, and eviction and quantisation multiply.
"""

from __future__ import annotations

from typing import Union

import mlx.core as mx

from .selection import gather_tokens

Storage = Union[mx.array, tuple]

#: mlx-lm's default ``--kv-group-size``.
DEFAULT_GROUP_SIZE = 64
SUPPORTED_BITS = (4, 8)


def check_bits(bits: int | None, group_size: int) -> None:
    """Reject settings mlx-lm's quantised cache does not offer, in one line."""
    if bits is not None and bits not in SUPPORTED_BITS:
        raise ValueError(f"--kv-bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"--kv-group-size must be 32, 64 or 128, got {group_size}")


def quantize(x: mx.array, group_size: int, bits: int) -> tuple:
    """``[B, H, S, D]`` floats -> the ``(packed, scales, biases)`` triple."""
    return tuple(mx.quantize(x, group_size=group_size, bits=bits))


def dequantize(storage: Storage, group_size: int, bits: int) -> mx.array:
    """Floats ``[B, H, N, D]`` (in the scales' dtype) from a triple; arrays pass through."""
    if not isinstance(storage, tuple):
        return storage
    return mx.dequantize(*storage, group_size=group_size, bits=bits)


def _parts(storage: Storage) -> tuple:
    return storage if isinstance(storage, tuple) else (storage,)


def _like(storage: Storage, parts: list) -> Storage:
    return tuple(parts) if isinstance(storage, tuple) else parts[0]


def capacity(storage: Storage | None) -> int:
    return 0 if storage is None else _parts(storage)[0].shape[2]


def grow(storage: Storage | None, used: int, needed: int, step: int, new: Storage) -> Storage:
    """Room for ``needed`` more tokens after the first ``used``, in ``step`` increments.

    ``new`` (the tokens about to be written) gives the shapes and dtypes.
    """
    if used + needed <= capacity(storage):
        return storage
    extra = step * ((used + needed - capacity(storage) + step - 1) // step)
    grown = []
    for i, like in enumerate(_parts(new)):
        zeros = mx.zeros((*like.shape[:2], extra, *like.shape[3:]), like.dtype)
        grown.append(zeros if storage is None else mx.concatenate([_parts(storage)[i][:, :, :used], zeros], axis=2))
    return _like(new, grown)


def write(storage: Storage, start: int, new: Storage) -> None:
    """Write ``new`` tokens into ``storage`` at token ``start`` (in place)."""
    for part, value in zip(_parts(storage), _parts(new)):
        part[:, :, start : start + value.shape[2]] = value


def head(storage: Storage | None, n: int) -> Storage | None:
    """The first ``n`` tokens."""
    if storage is None:
        return None
    return _like(storage, [p[:, :, :n] for p in _parts(storage)])


def gather(storage: Storage, kept: mx.array) -> Storage:
    """Each head's kept tokens, ``kept`` ``[B, H, K]``."""
    return _like(storage, [gather_tokens(p, kept) for p in _parts(storage)])


def nbytes(storage: Storage | None) -> int:
    return 0 if storage is None else sum(p.nbytes for p in _parts(storage))


def arrays(storage: Storage | None) -> list:
    """The arrays to evaluate."""
    return [] if storage is None else list(_parts(storage))
