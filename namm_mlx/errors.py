"""The one base class of every error whose message is meant for a user.

A :class:`NammError` says what went wrong and what to do in its message, so
the CLI prints that message as one line instead of a traceback. Each concrete
error also keeps the built-in base it always had (``ValueError``,
``RuntimeError``), so ``except ValueError`` in callers keeps working.
"""

from __future__ import annotations


class NammError(Exception):
    """Bad input or an unusable environment, explained in the message."""


def describe(err: BaseException) -> str:
    """``err`` as one line: a :class:`NammError`'s own message, anything else
    prefixed with its type (``OSError: [Errno 28] No space left on device``)."""
    text = " ".join(str(err).split())
    if isinstance(err, NammError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


__all__ = ["NammError", "describe"]
