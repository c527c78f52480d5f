"""Torch-free writer of ``torch.save``-compatible files.

The pickle opcodes are emitted by a tiny purpose-built serializer because the
standard ``pickle.Pickler`` refuses to reference globals
(``torch._utils._rebuild_tensor_v2``) that cannot be imported here; tensors
are written as raw little-endian storages in a torch-style zip, which
``torch.load`` (also with ``weights_only=True``) reads.
"""

from __future__ import annotations

import collections
import io
import math
import os
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import describe
from ..files import atomic_write
from .errors import CheckpointError

_ZIP_ALIGNMENT = 64


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
    try:
        atomic_write(path, lambda fh: _write_torch_zip(fh, _archive_name(path), obj))
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {describe(exc)}") from exc
