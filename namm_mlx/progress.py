"""One status line on stderr for long jobs, and the one duration format.

On a terminal the line is rewritten in place; elsewhere (logs, pipes) each
update is its own line, so a log keeps every step.
"""

from __future__ import annotations

import math
import sys
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when unknown (NaN or infinite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def remaining(elapsed: float, done: float, total: float) -> float:
    """Seconds left at the pace so far; NaN before any work is done."""
    return elapsed / done * (total - done) if done else float("nan")


class StatusLine:
    """Show progress text on ``stream`` (stderr by default).

    enabled: False makes every call a no-op, so callers need no branches.
    """

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.dirty = False

    def show(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End an in-place line with a newline (nothing to do otherwise)."""
        if self.enabled and self.dirty:
            self.stream.write("\n")
            self.stream.flush()
            self.dirty = False


__all__ = ["StatusLine", "format_duration", "remaining"]
