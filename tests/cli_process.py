"""Run ``namm`` as a real process from the repository and check its error lines.

``run_namm`` runs this checkout's ``cli`` package (installed or not) with this
interpreter and the Hub offline, so a test can never reach the network or an
older installed copy; ``assert_one_line_error`` is the project's rule for bad
input: a non-zero exit and exactly one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = Path(__file__).parent / "data" / "pride_and_prejudice.txt"


def run_namm(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m cli ARGS`` in ``cwd`` with the repository importable and the Hub offline."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """A non-zero exit whose stderr is one line holding ``message``."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
