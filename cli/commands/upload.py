"""``namm upload``: share a NAMM folder on the Hugging Face Hub with a model card.

Thin wrapper over :mod:`namm_mlx.hub`: the folder is validated and staged
(its two files plus a generated README.md) before anything is sent, so
``--dry-run`` shows exactly what would be uploaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from namm_mlx.hub import stage_upload, upload as push

from ..errors import user_errors


def upload(
    namm_dir: Path = typer.Argument(..., metavar="DIR", help="NAMM folder (namm.safetensors + namm_config.json)"),
    repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="Hugging Face repo to create or update"),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="the model it was evolved or distilled for (hub id), shown on the card"
    ),
    results: Optional[Path] = typer.Option(
        None, "--results", help="a `namm eval` results.json for the card's evaluation row (default: DIR/results.json)"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="staging folder for the files and the card (default: ./hub-upload/NAME)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="write the card and staged files locally, upload nothing"),
    private: bool = typer.Option(False, "--private", help="create the repo as private"),
    message: Optional[str] = typer.Option(None, "--message", help="commit message"),
) -> None:
    """Upload a NAMM to the Hugging Face Hub with a generated model card."""
    with user_errors():
        stage = stage_upload(
            namm_dir, repo_id, out or Path("hub-upload") / repo_id.split("/")[-1], base_model=base_model,
            results_path=results,
        )
        if dry_run:
            print(f"dry run: model card written to {stage / 'README.md'}; nothing uploaded", file=sys.stderr)
            print(stage)
            return
        url = push(stage, repo_id, private=private, message=message)
        print(f"uploaded {repo_id}: {url}", file=sys.stderr)
        print(f"https://huggingface.co/{repo_id}")
