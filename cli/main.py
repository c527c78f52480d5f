"""``namm``: chat with long documents, convert and evolve NAMMs (see ``namm --help``)."""

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


def _register_commands() -> None:
    """Each command lives in its own module and registers itself on ``app``."""
    from . import commands  # noqa: F401


_register_commands()
