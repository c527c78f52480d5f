"""Shared test fixtures: the reference golden data is committed under tests/fixtures/."""

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Golden data written by the original PyTorch NAMM code (see its README for provenance).
REFERENCE = REPO_ROOT / "tests" / "fixtures" / "namm-reference"


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
