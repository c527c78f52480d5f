"""Turn expected failures into one line on stderr and a non-zero exit.

Every command runs inside :func:`user_errors`: a user never sees a traceback
for bad input (missing files, corrupt weights, unsupported models), only what
went wrong and what to do.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer

from namm_mlx.errors import NammError

#: Exceptions that carry a user-facing message. Others are bugs and keep their traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (NammError, FileNotFoundError, IsADirectoryError)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``error: message`` (one line) and exit with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        fail(str(err) or type(err).__name__)
    except KeyboardInterrupt:
        fail("interrupted", 130)
