"""The ``namm`` Typer application object, before any command is registered.

:mod:`cli.main` registers the commands on it; a command module that still
registers itself with ``@app.command()`` imports it from here, never from
:mod:`cli.main`, so no command module imports the module that imports it.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="namm",
    help="Neural Attention Memory Models on MLX: learned KV-cache eviction for mlx-lm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Neural Attention Memory Models on MLX."""
