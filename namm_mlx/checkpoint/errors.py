"""The checkpoint modules' one error type."""

from __future__ import annotations

from ..errors import NammError


class CheckpointError(NammError, ValueError):
    """A checkpoint cannot be read or written; the message is one user-facing line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace so every error fits on one line (CLI output, logs)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
