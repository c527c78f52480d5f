"""Shared test fixtures: the reference golden data is committed under tests/fixtures/."""

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Golden data written by the original PyTorch NAMM code (see its README for provenance).
REFERENCE = REPO_ROOT / "tests" / "fixtures" / "namm-reference"


def _share_blas_threads_between_workers() -> None:
    """Give each pytest-xdist worker (and the ``namm`` processes it starts) its
    share of the cores for OpenBLAS.

    OpenBLAS's pthread build starts one thread per core in every process and
    spins while it waits, so two workers on two cores, each with two BLAS
    threads, spend much of their time in the kernel: a 1.7k-token ``namm
    generate`` beside another busy process took 81 s (49 s of it system time)
    with two threads and 44 s (3 s) with one. The preloaded library has read
    its thread count by now, so the worker itself is set through OpenBLAS's
    own call; its subprocesses read the environment. A count the user set is
    left alone.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OPENBLAS_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    set_threads = getattr(ctypes.CDLL(None), "openblas_set_num_threads", None)  # absent without OpenBLAS (macOS)
    if set_threads is not None:
        set_threads(threads)


_share_blas_threads_between_workers()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The golden fixtures; a missing folder is a failure, never a skip."""
    assert REFERENCE.is_dir(), f"reference fixtures not found at {REFERENCE}: the checkout is incomplete"
    return REFERENCE


@pytest.fixture(scope="session")
def reference_conversion(reference_dir) -> dict[str, np.ndarray]:
    """The tiny reference checkpoint as the original code converted it:
    ``param_vector``, ``norm.mean``, ``norm.var`` and the rest of the golden file."""
    import mlx.core as mx

    return {k: np.asarray(v) for k, v in mx.load(str(reference_dir / "expected_conversion_tiny.safetensors")).items()}


@pytest.fixture(scope="session")
def reference_namm(reference_conversion):
    """The tiny reference NAMM (a real evolved-format vector) with the default config."""
    from namm_mlx import NAMM

    e = reference_conversion
    return NAMM.from_flat(e["param_vector"], e["norm.mean"], e["norm.var"])
