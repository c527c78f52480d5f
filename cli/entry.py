"""The ``namm`` console script: arrange a fast BLAS first, then run the app.

The BLAS check runs before ``cli.main`` is imported, because importing the
commands loads mlx, and a re-executed process would pay that import twice.
"""

from __future__ import annotations


def main() -> None:
    from .blas import ensure_openblas

    ensure_openblas()
    from .main import app

    app(prog_name="namm")
