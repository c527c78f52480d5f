"""Atomic file writes: readers see the old file or the whole new one, never a part.

The new content goes to a temp file beside the target (same filesystem, so the
rename is atomic), is flushed and fsynced, then renamed over the target; the
directory is fsynced too, so the rename survives a power cut. On any failure
the temp file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once: ``os.umask`` can only be read by setting it, which races with threads.
UMASK = _umask()


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return  # e.g. directories cannot be opened on Windows; the rename is done anyway
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write (by name, e.g. for ``mx.save_safetensors``);
    it replaces ``target`` when the block finishes without an exception.

    suffix: the temp file's ending, for writers that insist on one. mode: the
    file's permissions (default: what a plain ``open()`` gives under the umask).
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK if mode is None else mode)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(target.parent, directory=True)


def atomic_write(target: str | os.PathLike, content: str | bytes | Callable[[Any], None]) -> Path:
    """Write ``content`` to ``target`` atomically and return ``target``.

    content: text (UTF-8, ``\\n`` line ends), bytes, or a function that writes
    to the open binary file (``lambda fh: np.savez(fh, **arrays)``).
    """
    target = Path(target)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            if callable(content):
                content(fh)
            elif isinstance(content, str):
                fh.write(content.encode("utf-8"))
            else:
                fh.write(content)
    return target


def stale_temps(target: str | os.PathLike) -> list[Path]:
    """Temp files that writers of ``target`` killed mid-write left beside it:
    :func:`atomic_path`'s ``.<name>-*`` and the ``.<stem>-*<suffix>`` of earlier versions."""
    target = Path(target)
    patterns = {f".{target.name}-*", f".{target.stem}-*{target.suffix}"}
    return sorted({p for pattern in patterns for p in target.parent.glob(pattern)})


__all__ = ["UMASK", "atomic_path", "atomic_write", "stale_temps"]
