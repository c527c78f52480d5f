"""``python -m cli`` runs the ``namm`` command."""

from cli.main import app

app(prog_name="namm")
