"""``namm``: chat with long documents, convert, evaluate and evolve NAMMs (see ``namm --help``).

Each command is a plain function in its own module under ``cli/commands``
(thin: the work happens in ``namm_mlx``); this module registers them on the
app, in ``namm --help``'s order, as mlx-lm's ``cli.py`` lists its commands.
"""

from __future__ import annotations

import typer

from .commands import chat, convert, data, distill, evolve, probe, serve, upload
from .commands import eval as eval_command

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


app.command()(convert.convert)
app.command()(convert.export)
app.add_typer(data.data_app, name="data")
app.command()(chat.chat)
app.command()(chat.generate)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve.serve)
app.command()(evolve.evolve)
app.command("eval", epilog=eval_command.policies_epilog())(eval_command.eval_command)
app.command()(upload.upload)
app.command()(distill.distill)
app.command()(probe.probe)

__all__ = ["app"]
