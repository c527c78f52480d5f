"""Shared test fixtures: the reference golden data lives in ../shared beside the repo."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REFERENCE = SHARED / "fixtures" / "namm-reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The golden fixtures; a missing folder is a failure, never a skip."""
    assert REFERENCE.is_dir(), (
        f"reference fixtures not found at {REFERENCE}: clone the project with shared/ beside it"
    )
    return REFERENCE
