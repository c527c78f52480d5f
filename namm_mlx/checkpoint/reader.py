"""Torch-free, allow-listed reader of ``torch.save`` files (zip and legacy formats).

A ``torch.save`` file's pickle is code: an unrestricted ``pickle.load`` /
``torch.load(weights_only=False)`` of a file from the internet can run
anything. This module never calls the stock unpickler on untrusted bytes: it
parses the pickle with an allow-list of the handful of globals a NAMM
checkpoint uses, each one re-implemented here with numpy, so MLX users need
neither torch nor trust in the file. Archive members are size-checked before
they are read (zip bombs).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import describe
from .errors import CheckpointError

__all__ = ["load_torch_pickle"]

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
        raise CheckpointError(f"cannot open {path}: {describe(exc)}") from exc
    except (MemoryError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {source}: {describe(exc)}; the file is corrupt or malicious") from exc
    except Exception as exc:  # zipfile.BadZipFile (CRC), EOFError, UnpicklingError, OSError, TypeError...
        raise CheckpointError(
            f"cannot read {source}: {describe(exc)}; the file is truncated or corrupt - "
            "re-copy it or use another checkpoint"
        ) from exc
