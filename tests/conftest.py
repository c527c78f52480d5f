"""Shared test fixtures: the reference golden data is committed under tests/fixtures/."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Golden data written by the original PyTorch NAMM code (see its README for provenance).
REFERENCE = REPO_ROOT / "tests" / "fixtures" / "namm-reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The golden fixtures; a missing folder is a failure, never a skip."""
    assert REFERENCE.is_dir(), f"reference fixtures not found at {REFERENCE}: the checkout is incomplete"
    return REFERENCE
