"""``namm data``: fetch the long texts and benchmark files used by evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from namm_mlx.data import ROUTES, available_texts, fetch_texts, longbench_files

from ..errors import fail, user_errors


data_app = typer.Typer(
    help="Public-domain books (Austen, Moby Dick, the KJV) and LongBench, from the Hugging Face Hub "
    "and Project Gutenberg, or offline from Debian packages."
)


@data_app.command("fetch")
def fetch(
    names: Optional[List[str]] = typer.Argument(
        None, help="sources or texts (austen, mobydick, kjv, longbench); default: the three book sources"
    ),
    source: str = typer.Option(
        "auto", "--source",
        help="hub: Hugging Face Hub + HTTPS (any OS); debian: Debian packages (apt-get download or --deb-dir); "
        "auto: hub, then debian where apt-get exists",
    ),
    deb_dir: Optional[Path] = typer.Option(None, "--deb-dir", help="folder of pre-downloaded .deb files"),
    force: bool = typer.Option(False, "--force", help="re-download even if cached"),
) -> None:
    """Download the texts into the cache (nothing is installed)."""
    with user_errors():
        if source not in ROUTES:
            fail(f"--source must be one of {', '.join(ROUTES)}, not {source!r}")
        paths = fetch_texts(names or None, force=force, deb_dir=deb_dir, route=source)
    for name, path in sorted(paths.items()):
        print(f"{name}\t{path}")


@data_app.command("list")
def list_texts() -> None:
    """Texts and LongBench files already in the cache."""
    with user_errors():
        for name, path in sorted(available_texts().items()):
            print(f"{name}\t{path}")
        for name, path in longbench_files().items():
            print(f"longbench/{name}\t{path}")
