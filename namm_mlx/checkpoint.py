"""Torch-free reader and writer for the SakanaAI evo-memory (NAMM) trainer checkpoint.

The original trainer (``memory_trainer._save_ckpt``) stores ``ckpt.pt`` / ``latest.pt`` /
``iter_N.pt`` with ``torch.save``: a zip archive whose single top folder holds ``data.pkl``
(a protocol-2 pickle) and ``data/<key>`` (raw little-endian tensor storages). The pickle is
code: an unrestricted ``pickle.load``/``torch.load(weights_only=False)`` of a file from the
internet can run anything. This module therefore never calls the stock unpickler on
untrusted bytes. It parses the pickle with an allow-list of the handful of globals a NAMM
checkpoint uses, each one re-implemented here with numpy, so MLX users need neither torch
nor trust in the file.

The writer produces a file that ``torch.load`` (also with ``weights_only=True``) reads and
that the reference trainer's ``init_from`` accepts (same keys, shapes and dtypes as its
``CMA_ES.state_dict()``), again without importing torch: the pickle opcodes are emitted by a
tiny purpose-built serializer because the standard ``pickle.Pickler`` refuses to reference
globals (``torch._utils._rebuild_tensor_v2``) that cannot be imported here.

Only the standard library and numpy are used.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import secrets
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "PARAM_SIZE",
    "NORM_BINS",
    "CheckpointError",
    "ReferenceCheckpoint",
    "read_reference_checkpoint",
    "load_torch_pickle",
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

DEFAULT_SIGMA = 0.065
ELITE_RATIO = 0.5

# Broadcast tensors (stride 0) may expand a tiny storage; refuse to materialise more than
# this many elements from a storage smaller than the tensor (a P x P placeholder is 17.4 M).
_MAX_BROADCAST_ELEMENTS = 1 << 28
# Zip bombs: a member is read only if its declared uncompressed size is exactly what its
# storage needs, and never more than these (a dense P x P covariance in float64 is 139 MB;
# a NAMM checkpoint's pickle is a few kB).
_MAX_STORAGE_BYTES = 256 << 20
_MAX_TOTAL_BYTES = 1 << 30
_MAX_PICKLE_BYTES = 64 << 20
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_ALIGNMENT = 64


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message is one user-facing line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def _one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace so every error fits on one line (CLI output, logs)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Restricted unpickling: the allow-listed globals, each re-implemented without torch
# --------------------------------------------------------------------------------------


class _Sealed:
    """Base of every object handed to the unpickler: it has no ``__dict__`` and refuses
    the pickle ``BUILD`` opcode, so a crafted pickle cannot re-point our stand-ins."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise CheckpointError(
            f"refused to load checkpoint: the pickle tries to modify {self!r}, "
            "which a NAMM checkpoint never does (possibly malicious)"
        )


class _ElementType(_Sealed):
    """Common part of the storage and dtype stand-ins: a name and the element type on disk."""

    __slots__ = ("name", "dtype", "bfloat16")

    def __init__(self, name: str, dtype: str, bfloat16: bool = False) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)
        self.bfloat16 = bfloat16

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _StorageKind(_ElementType):
    """Stand-in for ``torch.FloatStorage`` & co. (a distinct type from dtypes, so a
    pickle cannot pass a dtype where a storage is expected)."""

    __slots__ = ()


class _TorchDType(_ElementType):
    """Stand-in for ``torch.uint16`` & co., used with ``_rebuild_tensor_v3``."""

    __slots__ = ()


class _NumpyDType(_Sealed):
    """Stand-in for ``numpy.dtype(...)`` inside a pickle (only used to rebuild scalars).

    A real ``np.dtype`` would receive attacker-controlled ``__setstate__`` data; this one
    accepts only the plain state numpy writes for a simple numeric dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: object) -> None:
        ok = (
            isinstance(state, tuple)
            and len(state) >= 5
            and state[1] in ("<", ">", "|", "=")
            and state[3] is None
            and state[4] is None
        )
        if not ok:
            raise CheckpointError(
                "refused to load checkpoint: it pickles a structured or unusual numpy dtype, "
                "which a NAMM checkpoint never contains (possibly malicious)"
            )
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])

    def __repr__(self) -> str:
        return f"numpy.dtype({self.dtype.str!r})"


class _SafeCallable(_Sealed):
    """An allow-listed global: our own implementation under the name torch/numpy use."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        self.qualname = qualname
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.qualname


@dataclass
class _Storage:
    """A resolved storage: its elements as a flat array (``None`` during a dry pass)."""

    array: np.ndarray | None


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    """Validate a tensor size/stride: a tuple of non-negative Python ints."""
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(f"malformed tensor record: {what} {value!r} is not a tuple of non-negative ints")
    return value


def _view_storage(storage: object, offset: object, size: object, stride: object) -> np.ndarray | None:
    """Materialise a tensor from its storage, honouring offset and strides.

    Bounds are checked before ``as_strided`` (which itself checks nothing), so a crafted
    record cannot read memory outside the storage."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("malformed tensor record: its storage is not a persistent storage reference")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CheckpointError(f"malformed tensor record: storage offset {offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointError(f"malformed tensor record: size {shape} and stride {strides} differ in length")
    arr = storage.array
    if arr is None:  # dry pass of the legacy format: data not read yet
        return None
    count = math.prod(shape)
    if count == 0:
        if offset > arr.size:
            raise CheckpointError("malformed tensor record: storage offset past the end of its storage")
        return np.empty(shape, dtype=arr.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if last >= arr.size:
        raise CheckpointError(
            f"tensor of shape {list(shape)} reads element {last} of a storage with {arr.size} elements; "
            "the file is corrupt"
        )
    if count > arr.size and count > _MAX_BROADCAST_ELEMENTS:
        raise CheckpointError(
            f"tensor of shape {list(shape)} would expand a {arr.size}-element storage to {count} elements; refused"
        )
    byte_strides = tuple(s * arr.itemsize for s in strides)
    view = np.lib.stride_tricks.as_strided(arr[offset:], shape=shape, strides=byte_strides, writeable=False)
    return view.copy()


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> np.ndarray | None:
    """``torch._utils._rebuild_tensor_v2``: a tensor as a numpy array (grad info ignored)."""
    return _view_storage(storage, storage_offset, size, stride)


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object) -> np.ndarray | None:
    """``torch._utils._rebuild_tensor`` (older writers)."""
    return _view_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> np.ndarray | None:
    """``torch._utils._rebuild_tensor_v3``: untyped (byte) storage plus a torch dtype,
    which torch uses for dtypes without a typed storage class (uint16/32/64)."""
    if not isinstance(dtype, _TorchDType):
        raise CheckpointError(f"malformed tensor record: dtype {dtype!r} is not a torch dtype")
    if isinstance(storage, _Storage) and storage.array is not None:
        raw = storage.array
        if raw.dtype != np.uint8:
            raise CheckpointError("malformed tensor record: _rebuild_tensor_v3 needs an untyped storage")
        usable = raw.size - raw.size % dtype.dtype.itemsize
        typed = raw[:usable].view(dtype.dtype)
        storage = _Storage(_to_native(typed, dtype.bfloat16))
    return _view_storage(storage, storage_offset, size, stride)


def _numpy_scalar(dtype: object, data: object = None) -> np.generic:
    """``numpy.core.multiarray.scalar``: rebuild a numpy scalar from its raw bytes."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("malformed numpy scalar in checkpoint")
    if len(data) != dtype.dtype.itemsize:
        raise CheckpointError("malformed numpy scalar in checkpoint: wrong byte count")
    value = np.frombuffer(bytes(data), dtype=dtype.dtype)[0]
    return value.astype(dtype.dtype.newbyteorder("="))


_SIMPLE_DTYPE = re.compile(r"^[<>=|]?(?:[biuf][1248]|c(?:8|16)|f2|\?)$")


def _numpy_dtype(spec: object, align: object = False, copy: object = False) -> _NumpyDType:
    """``numpy.dtype``: only simple numeric dtypes such as ``'f8'`` are accepted."""
    if not isinstance(spec, str) or not _SIMPLE_DTYPE.match(spec):
        raise CheckpointError(
            f"refused to load checkpoint: it pickles numpy dtype {spec!r}, which a NAMM checkpoint never contains"
        )
    return _NumpyDType(np.dtype(spec))


def _codecs_encode(obj: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: ``encode(str, 'latin1')``.

    Restricted to latin-1/utf-8 so no other codec (zlib, bz2, ...) is reachable."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8"):
        raise CheckpointError(f"refused to load checkpoint: it uses _codecs.encode with {encoding!r}")
    return obj.encode(str(encoding))


def _build_allowed_globals() -> dict[tuple[str, str], object]:
    """The complete allow-list: (module, name) as written in the pickle -> our object."""
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _SafeCallable("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor"): _SafeCallable("torch._utils._rebuild_tensor", _rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v3"): _SafeCallable("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
        ("numpy.core.multiarray", "scalar"): _SafeCallable("numpy.core.multiarray.scalar", _numpy_scalar),
        ("numpy._core.multiarray", "scalar"): _SafeCallable("numpy._core.multiarray.scalar", _numpy_scalar),
        ("numpy", "dtype"): _SafeCallable("numpy.dtype", _numpy_dtype),
        ("_codecs", "encode"): _SafeCallable("_codecs.encode", _codecs_encode),
    }
    storages = {
        "FloatStorage": "<f4",
        "DoubleStorage": "<f8",
        "HalfStorage": "<f2",
        "BFloat16Storage": "<u2",
        "LongStorage": "<i8",
        "IntStorage": "<i4",
        "ShortStorage": "<i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
    }
    for name, dtype in storages.items():
        kind = _StorageKind(name, dtype, bfloat16=name == "BFloat16Storage")
        allowed[("torch", name)] = kind
        allowed[("torch.cuda", name)] = kind  # pre-2.0 writers named the CUDA class
    untyped = _StorageKind("UntypedStorage", "u1")
    allowed[("torch", "UntypedStorage")] = untyped
    allowed[("torch.storage", "UntypedStorage")] = untyped
    torch_dtypes = {
        "float32": "<f4",
        "float64": "<f8",
        "float16": "<f2",
        "bfloat16": "<u2",
        "int64": "<i8",
        "int32": "<i4",
        "int16": "<i2",
        "int8": "i1",
        "uint8": "u1",
        "bool": "?",
        "uint16": "<u2",
        "uint32": "<u4",
        "uint64": "<u8",
    }
    for name, dtype in torch_dtypes.items():
        allowed[("torch", name)] = _TorchDType(name, dtype, bfloat16=name == "bfloat16")
    return allowed


_ALLOWED_GLOBALS = _build_allowed_globals()


def _to_native(array: np.ndarray, bfloat16: bool) -> np.ndarray:
    """Convert stored elements to native byte order; bfloat16 (no numpy type) -> float32."""
    if bfloat16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array


class _StorageSource:
    """Resolves ``('storage', kind, key, location, numel[, view])`` persistent ids."""

    def get(self, kind: _StorageKind, key: str, numel: int, view: object) -> _Storage:
        raise CheckpointError("unexpected tensor data outside the checkpoint's main pickle")


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns our allow-listed stand-ins.

    Every global is resolved by ``find_class`` before it can be called, so a refused name
    aborts loading before any of the pickle's code runs."""

    def __init__(self, file: IO[bytes], source: str, storages: _StorageSource) -> None:
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refused to load {self._source}: it references {module}.{name}, which a NAMM checkpoint "
                "never contains (possibly malicious); only load checkpoints from sources you trust"
            ) from None

    def persistent_load(self, pid: object) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise CheckpointError(f"{self._source}: unsupported persistent id in pickle; not a torch checkpoint")
        typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        kind, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if typename != "storage" or not isinstance(kind, _StorageKind):
            raise CheckpointError(f"{self._source}: unsupported persistent id {typename!r}; not a torch checkpoint")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(f"{self._source}: malformed storage reference {pid[2:5]!r}")
        return self._storages.get(kind, key, numel, view)


class _ZipStorages(_StorageSource):
    """Storages of the zip format: ``<prefix>/data/<key>``, read on first reference."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, big_endian: bool, source: str) -> None:
        self._archive = archive
        self._prefix = prefix
        self._big_endian = big_endian
        self._source = source
        self._cache: dict[str, tuple[str, _Storage]] = {}
        self._total = 0

    def get(self, kind: _StorageKind, key: str, numel: int, view: object) -> _Storage:
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] != kind.name:
                raise CheckpointError(f"{self._source}: storage data/{key} is referenced with two element types")
            return cached[1]
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"{self._source} is incomplete: storage entry data/{key} is missing from the archive; re-copy the file"
            ) from None
        dtype = kind.dtype.newbyteorder(">" if self._big_endian else "<") if kind.dtype.itemsize > 1 else kind.dtype
        needed = numel * dtype.itemsize
        self._total += needed
        if info.file_size < needed:
            raise CheckpointError(
                f"{self._source} is corrupt: storage data/{key} holds {info.file_size} bytes, {needed} needed; "
                "re-copy the file"
            )
        if info.file_size > needed or needed > _MAX_STORAGE_BYTES or self._total > _MAX_TOTAL_BYTES:
            raise CheckpointError(
                f"refused to read {self._source}: storage data/{key} declares {info.file_size:,} bytes "
                f"(its tensor needs {needed:,}; a NAMM checkpoint's largest is under {_MAX_STORAGE_BYTES:,}); "
                "the file is corrupt or a zip bomb"
            )
        raw = _read_member(self._archive, info, needed)
        array = _to_native(np.frombuffer(raw, dtype=dtype, count=numel), kind.bfloat16)
        storage = _Storage(array)
        self._cache[key] = (kind.name, storage)
        return storage


class _LegacyStorages(_StorageSource):
    """Storages of the pre-1.6 format, which follow the main pickle in the file.

    The first (dry) pass only records which storages exist; ``read_raw`` then reads them
    and a second pass over the main pickle builds the tensors."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._kinds: dict[str, tuple[_StorageKind, int]] = {}
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, kind: _StorageKind, key: str, numel: int, view: object) -> _Storage:
        known = self._kinds.setdefault(key, (kind, numel))
        if known[0].name != kind.name or known[1] != numel:
            raise CheckpointError(f"{self._source}: storage {key} is referenced with two element types or sizes")
        array = self._arrays.get(key)
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, (int, str)) for v in view)):
                raise CheckpointError(f"{self._source}: malformed storage view {view!r}")
            _view_key, start, length = view
            if (
                not isinstance(start, int)
                or not isinstance(length, int)
                or start < 0
                or length < 0
                or start + length > numel
            ):
                raise CheckpointError(f"{self._source}: storage view {view!r} lies outside storage {key}")
            if array is not None:
                array = array[start : start + length]
        return _Storage(array)

    def read_raw(self, fh: IO[bytes], keys: object) -> None:
        """Read ``<int64 numel><numel elements>`` records in the order of ``keys``."""
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"{self._source}: malformed storage key list; the file is corrupt")
        for key in keys:
            if key not in self._kinds:
                raise CheckpointError(f"{self._source}: storage {key} is listed but never used; the file is corrupt")
            kind, numel = self._kinds[key]
            header = fh.read(8)
            if len(header) != 8 or int.from_bytes(header, "little", signed=True) != numel:
                raise CheckpointError(f"{self._source} is truncated or corrupt: bad size record for storage {key}")
            nbytes = numel * kind.dtype.itemsize
            left = os.fstat(fh.fileno()).st_size - fh.tell()
            if nbytes > left:
                raise CheckpointError(
                    f"{self._source} is truncated: storage {key} needs {nbytes:,} bytes, {max(left, 0):,} remain"
                )
            raw = fh.read(nbytes)
            if len(raw) != nbytes:
                raise CheckpointError(
                    f"{self._source} is truncated: storage {key} is short of {nbytes - len(raw)} bytes"
                )
            dtype = kind.dtype.newbyteorder("<") if kind.dtype.itemsize > 1 else kind.dtype
            self._arrays[key] = _to_native(np.frombuffer(raw, dtype=dtype), kind.bfloat16)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """At most ``limit`` bytes of a member: decompression stops there whatever the
    member's header claims."""
    with archive.open(info) as member:
        return member.read(limit)


def _archive_prefix(archive: zipfile.ZipFile, source: str) -> str:
    """The single top folder holding ``data.pkl`` (named after the file stem by torch)."""
    tops = {name.split("/", 1)[0] for name in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", name)}
    if not tops:
        raise CheckpointError(
            f"{source} is a zip archive without data.pkl; it is not a torch checkpoint (or it is damaged)"
        )
    if len(tops) > 1:
        raise CheckpointError(
            f"{source} holds several pickles ({', '.join(sorted(tops))}); it is not a single torch checkpoint"
        )
    return tops.pop()


def _zip_big_endian(archive: zipfile.ZipFile, prefix: str, source: str) -> bool:
    """Honour the optional ``byteorder`` record (absent = little, as torch assumes)."""
    try:
        info = archive.getinfo(f"{prefix}/byteorder")
    except KeyError:
        return False
    order = _read_member(archive, info, 16).strip()
    if order not in (b"little", b"big"):
        raise CheckpointError(f"{source}: unknown byte order {order[:16]!r} in the byteorder record")
    return order == b"big"


def _load_zip(path: Path) -> object:
    """Zip format (torch >= 1.6): parse ``data.pkl``; storages come from ``data/<key>``."""
    source = path.name
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{source} is a damaged zip archive (truncated or corrupt); re-copy it or use another checkpoint"
        ) from None
    with archive:
        prefix = _archive_prefix(archive, source)
        storages = _ZipStorages(archive, prefix, _zip_big_endian(archive, prefix, source), source)
        info = archive.getinfo(f"{prefix}/data.pkl")
        if info.file_size > _MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"refused to read {source}: its data.pkl declares {info.file_size:,} bytes, far more than a NAMM "
                "checkpoint's; the file is corrupt or a zip bomb"
            )
        pickled = _read_member(archive, info, _MAX_PICKLE_BYTES)
        return _RestrictedUnpickler(io.BytesIO(pickled), source, storages).load()


def _load_legacy(path: Path) -> object:
    """Pre-1.6 format: magic, protocol and sys-info pickles, the main pickle, the storage
    key list, then each storage as ``<int64 numel><raw little-endian elements>``."""
    source = path.name
    no_storage = _StorageSource()
    with open(path, "rb") as fh:
        magic = _RestrictedUnpickler(fh, source, no_storage).load()
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{source} is a pickle but not a torch checkpoint (no torch magic number)")
        protocol = _RestrictedUnpickler(fh, source, no_storage).load()
        if protocol != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{source}: unsupported legacy torch format version {protocol!r}")
        _RestrictedUnpickler(fh, source, no_storage).load()  # sys_info: data is always little-endian
        main_start = fh.tell()
        storages = _LegacyStorages(source)
        _RestrictedUnpickler(fh, source, storages).load()  # dry pass: learn the storages
        keys = _RestrictedUnpickler(fh, source, no_storage).load()
        storages.read_raw(fh, keys)
        fh.seek(main_start)
        return _RestrictedUnpickler(fh, source, storages).load()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_torch_pickle(path: str | os.PathLike[str]) -> object:
    """Load a ``torch.save`` file without torch and without running its pickle's code.

    Tensors become numpy arrays (contiguous copies, strides honoured), numpy scalars stay
    numpy scalars, ``OrderedDict`` stays ``OrderedDict``. Globals outside the allow-list
    (anything but tensors, storages, OrderedDict and numpy scalars) raise
    :class:`CheckpointError` before they can run. Both the zip format (torch >= 1.6) and
    the legacy pre-1.6 format are read."""
    path = Path(path)
    source = path.name
    try:
        if path.is_dir():
            raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it (e.g. ckpt.pt)")
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path} (expected a file such as ckpt.pt or latest.pt)")
        if path.stat().st_size == 0:
            raise CheckpointError(
                f"{source} is empty (0 bytes); the save was probably interrupted - use another checkpoint"
            )
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head.startswith(b"PK"):
            return _load_zip(path)
        if head[:1] == b"\x80":
            return _load_legacy(path)
        raise CheckpointError(f"{source} is not a torch checkpoint (neither a zip archive nor a pickle)")
    except CheckpointError:
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"cannot open {path}: {_describe(exc)}") from exc
    except (MemoryError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {source}: {_describe(exc)}; the file is corrupt or malicious") from exc
    except Exception as exc:  # zipfile.BadZipFile (CRC), EOFError, UnpicklingError, OSError, TypeError...
        raise CheckpointError(
            f"cannot read {source}: {_describe(exc)}; the file is truncated or corrupt - "
            "re-copy it or use another checkpoint"
        ) from exc


# --------------------------------------------------------------------------------------
# The NAMM trainer checkpoint
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Writing: a protocol-2 pickle emitted opcode by opcode, and a torch-style zip
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Global:
    """A global referenced by name (``GLOBAL`` opcode); it need not be importable here."""

    module: str
    name: str


@dataclass(frozen=True)
class _Reduce:
    """``func(*args)`` at load time (``REDUCE`` opcode)."""

    func: _Global
    args: tuple


@dataclass(frozen=True)
class _Persistent:
    """A persistent id (``BINPERSID`` opcode): how torch pickles point at storages."""

    pid: tuple


@dataclass(eq=False)
class _OutStorage:
    """A storage to write as ``data/<key>``; identity matters (shared storages)."""

    kind: str  # torch storage class name, e.g. "FloatStorage"
    numel: int
    itemsize: int
    write: Callable[[IO[bytes]], None]


@dataclass(frozen=True)
class _OutTensor:
    """A tensor record: a view (offset, shape, strides in elements) of an ``_OutStorage``."""

    storage: _OutStorage
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0


_KIND_BY_DTYPE = {
    "f4": "FloatStorage",
    "f8": "DoubleStorage",
    "f2": "HalfStorage",
    "i8": "LongStorage",
    "i4": "IntStorage",
    "i2": "ShortStorage",
    "i1": "CharStorage",
    "u1": "ByteStorage",
    "b1": "BoolStorage",
}


def _dense_storage(array: np.ndarray) -> _OutStorage:
    """A storage holding ``array``'s elements, little-endian, row-major."""
    code = f"{array.dtype.kind}{array.dtype.itemsize}"
    if code not in _KIND_BY_DTYPE:
        raise CheckpointError(f"cannot write a tensor of numpy dtype {array.dtype}")
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return _OutStorage(_KIND_BY_DTYPE[code], array.size, array.dtype.itemsize, lambda out: out.write(data))


def _dense_tensor(array: np.ndarray) -> _OutTensor:
    """A contiguous tensor over its own storage."""
    array = np.asarray(array)
    strides = tuple(int(math.prod(array.shape[i + 1 :])) for i in range(array.ndim))
    return _OutTensor(_dense_storage(array), tuple(int(n) for n in array.shape), strides)


def _broadcast_tensor(storage: _OutStorage, shape: tuple[int, ...], stride: tuple[int, ...]) -> _OutTensor:
    """A stride-0 view, e.g. a [P,P] zero placeholder over a 1-element storage."""
    return _OutTensor(storage, shape, stride)


class _PickleEmitter:
    """Emits a protocol-2 pickle for dicts, OrderedDicts, lists, tuples, str, int, float,
    bool, None, named globals/reductions and tensors (as torch's ``_rebuild_tensor_v2``
    records with ``('storage', torch.<Kind>Storage, key, 'cpu', numel)`` persistent ids).

    ``pickle.Pickler`` cannot be used: it checks that every global it writes can be
    imported, and torch is not installed."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._memo: dict[_Global, int] = {}
        self.storages: dict[int, tuple[str, _OutStorage]] = {}

    def dumps(self, obj: object) -> bytes:
        self._out.write(b"\x80\x02")  # PROTO 2
        self._save(obj)
        self._out.write(b".")  # STOP
        return self._out.getvalue()

    def _save(self, obj: object) -> None:
        if isinstance(obj, _OutTensor):
            self._save_tensor(obj)
        elif isinstance(obj, _Global):
            self._save_global(obj)
        elif isinstance(obj, _Reduce):
            self._save(obj.func)
            self._save_tuple(obj.args)
            self._out.write(b"R")
        elif isinstance(obj, _Persistent):
            self._save_tuple(obj.pid)
            self._out.write(b"Q")  # BINPERSID
        elif isinstance(obj, np.ndarray):
            self._save_tensor(_dense_tensor(obj))
        elif obj is None:
            self._out.write(b"N")
        elif isinstance(obj, bool):
            self._out.write(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int):
            self._save_int(obj)
        elif isinstance(obj, float):
            self._out.write(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            self._out.write(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, tuple):
            self._save_tuple(obj)
        elif isinstance(obj, list):
            self._out.write(b"]")
            self._save_items(obj, b"e")
        elif isinstance(obj, collections.OrderedDict):
            self._save(_Reduce(_Global("collections", "OrderedDict"), ()))
            self._save_items([x for item in obj.items() for x in item], b"u")
        elif isinstance(obj, dict):
            self._out.write(b"}")
            self._save_items([x for item in obj.items() for x in item], b"u")
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__} for a torch checkpoint")

    def _save_items(self, flat: list, opcode: bytes) -> None:
        """MARK, items, then APPENDS/SETITEMS (nothing for an empty container)."""
        if flat:
            self._out.write(b"(")
            for item in flat:
                self._save(item)
            self._out.write(opcode)

    def _save_tuple(self, items: tuple) -> None:
        if len(items) <= 3:
            for item in items:
                self._save(item)
            self._out.write((b")", b"\x85", b"\x86", b"\x87")[len(items)])
        else:
            self._out.write(b"(")
            for item in items:
                self._save(item)
            self._out.write(b"t")

    def _save_int(self, value: int) -> None:
        if 0 <= value < 0x100:
            self._out.write(b"K" + bytes([value]))
        elif 0 <= value < 0x10000:
            self._out.write(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self._out.write(b"J" + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self._out.write(b"\x8a" + bytes([len(data)]) + data)

    def _save_global(self, ref: _Global) -> None:
        """GLOBAL once, then memo GETs (as torch's own files do)."""
        index = self._memo.get(ref)
        if index is not None:
            self._out.write(b"h" + bytes([index]) if index < 0x100 else b"j" + struct.pack("<I", index))
            return
        self._out.write(b"c" + f"{ref.module}\n{ref.name}\n".encode("ascii"))
        index = len(self._memo)
        self._memo[ref] = index
        self._out.write(b"q" + bytes([index]) if index < 0x100 else b"r" + struct.pack("<I", index))

    def _save_tensor(self, tensor: _OutTensor) -> None:
        storage = tensor.storage
        key, _ = self.storages.setdefault(id(storage), (str(len(self.storages)), storage))
        pid = _Persistent(("storage", _Global("torch", storage.kind), key, "cpu", storage.numel))
        hooks = collections.OrderedDict()  # backward hooks: none
        args = (pid, tensor.offset, tensor.shape, tensor.stride, False, hooks)
        self._save(_Reduce(_Global("torch._utils", "_rebuild_tensor_v2"), args))


def _aligned_zipinfo(name: str, position: int, size: int) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data starts on a 64-byte boundary (as torch aligns storages,
    which lets ``torch.load(mmap=True)`` map them), padded with an extra field."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    info.file_size = size
    header = 30 + len(name.encode("utf-8")) + 4
    pad = -(position + header) % _ZIP_ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding block, like torch
    return info


def _write_zip_entry(archive: zipfile.ZipFile, name: str, size: int, write: Callable[[IO[bytes]], None]) -> None:
    info = _aligned_zipinfo(name, archive.fp.tell(), size)
    with archive.open(info, "w") as out:
        write(out)


def _archive_name(path: Path) -> str:
    """Top folder of the archive: the file stem, as torch names it."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    return stem or "archive"


def _write_torch_zip(fh: IO[bytes], top: str, obj: object) -> None:
    """``data.pkl``, ``byteorder``, ``data/<key>`` and ``version`` in torch's layout."""
    emitter = _PickleEmitter()
    pickled = emitter.dumps(obj)
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as archive:
        _write_zip_entry(archive, f"{top}/data.pkl", len(pickled), lambda out: out.write(pickled))
        _write_zip_entry(archive, f"{top}/byteorder", 6, lambda out: out.write(b"little"))
        for key, storage in emitter.storages.values():
            _write_zip_entry(archive, f"{top}/data/{key}", storage.numel * storage.itemsize, storage.write)
        _write_zip_entry(archive, f"{top}/version", 2, lambda out: out.write(b"3\n"))


def _save_torch_zip(path: str | os.PathLike[str], obj: object) -> None:
    """Atomically write ``obj`` (dicts, tensors as numpy or ``_OutTensor``, scalars) as a
    ``torch.save``-compatible zip: a temporary file in the same directory is fully written
    and fsynced, then renamed over ``path``, so readers never see a half-written file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            _write_torch_zip(fh, _archive_name(path), obj)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {_describe(exc)}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class CmaDefaults:
    """Recombination constants of the reference CMA-ES (namm-spec §7.1)."""

    mu_eff: float
    mu_eff_minus: float
    c_1: float
    c_mu: float
    alpha_min: float
    weights: np.ndarray
    weights_truncated: np.ndarray


def cma_defaults(pop_size: int, n: int = PARAM_SIZE, elite_ratio: float = ELITE_RATIO) -> CmaDefaults:
    """The reference's ``get_cma_defaults``/``init_cma_es_params`` weights for ``pop_size``,
    so a written checkpoint carries genuine values rather than placeholders."""
    lam = pop_size
    mu = int(math.floor(lam * elite_ratio))
    n_clip = min(n, 40000)
    w_prime = math.log((lam + 1) / 2) - np.log(np.arange(lam, dtype=np.float64) + 1)
    elite, rest = w_prime[:mu], w_prime[mu:]
    mu_eff = float(elite.sum() ** 2 / (elite**2).sum())
    mu_eff_minus = float(rest.sum() ** 2 / (rest**2).sum())
    c_1 = 2 / ((n_clip + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1 - 1e-8, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n_clip + 2) ** 2 + mu_eff))
    alpha_min = min(1 + c_1 / c_mu, 1 + 2 * mu_eff_minus / (mu_eff + 2), (1 - c_1 - c_mu) / (n * c_mu))
    positive_sum = w_prime[w_prime > 0].sum()
    negative_sum = np.abs(w_prime[w_prime < 0]).sum()
    weights = np.where(w_prime >= 0, w_prime / positive_sum, alpha_min * w_prime / max(negative_sum, 1e-300))
    truncated = np.where(np.arange(lam) < mu, weights, 0.0)
    return CmaDefaults(
        mu_eff, mu_eff_minus, c_1, c_mu, alpha_min, weights.astype(np.float32), truncated.astype(np.float32)
    )


def _checked_array(value: object, what: str, size: int, size_text: str) -> np.ndarray:
    """A finite float array of ``size`` elements (any shape), or a CheckpointError."""
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise CheckpointError(f"{what} is not an array: {_describe(exc)}") from exc
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
    cma = cma_defaults(pop_size)
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
