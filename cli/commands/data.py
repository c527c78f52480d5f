"""``namm data``: fetch the public-domain long texts used by evaluation."""

from __future__ import annotations

from typing import List, Optional

import typer

from namm_mlx.data import DataError, available_texts, fetch_texts

from ..errors import register, user_errors
from ..main import app

register(DataError)

data_app = typer.Typer(help="Public-domain long texts (Austen, Moby Dick, the KJV) from Debian packages.")
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def fetch(
    names: Optional[List[str]] = typer.Argument(None, help="sources or texts (austen, mobydick, kjv); default all"),
    force: bool = typer.Option(False, "--force", help="re-download even if cached"),
) -> None:
    """Download the Debian packages (without installing them) and extract the texts."""
    with user_errors():
        paths = fetch_texts(names or None, force=force)
    for name, path in sorted(paths.items()):
        print(f"{name}\t{path}")


@data_app.command("list")
def list_texts() -> None:
    """Texts already extracted into the cache."""
    with user_errors():
        for name, path in sorted(available_texts().items()):
            print(f"{name}\t{path}")
