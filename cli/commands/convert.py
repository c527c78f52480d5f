"""``namm convert`` and ``namm export``: move NAMMs between the PyTorch trainer and MLX.

Thin wrappers over :mod:`namm_mlx.convert`; all checks live there so the
library and the CLI refuse the same inputs with the same messages.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli import errors
from namm_mlx.convert import convert_checkpoint, export_checkpoint



class Member(str, Enum):
    """Which CMA-ES member of a checkpoint to convert."""

    mean = "mean"
    best = "best"


def convert(
    source: Path = typer.Argument(
        ...,
        metavar="CKPT",
        help="Reference trainer checkpoint (ckpt.pt, latest.pt, iter_N.pt), or a flat "
        "4,172-value vector as .npy or .safetensors.",
        show_default=False,
    ),
    output: Path = typer.Option(
        ...,
        "-o",
        "--output",
        help="Folder to write (namm.safetensors + namm_config.json); an existing NAMM folder is replaced.",
        show_default=False,
    ),
    member: Member = typer.Option(
        Member.mean,
        "--member",
        help="Checkpoint member: 'mean' is what the reference deploys, 'best' the best sampled member.",
    ),
    norm: Optional[Path] = typer.Option(
        None,
        "--norm",
        metavar="FILE",
        help="For a flat vector: .safetensors or .npz with norm.mean and norm.var (or mean/var).",
        show_default=False,
    ),
) -> None:
    """Convert a NAMM evolved with the PyTorch reference into a folder NAMM.load reads."""
    with errors.user_errors():
        namm = convert_checkpoint(source, output, member=member.value, norm=norm)
    meta = namm.metadata
    details = [f"member {meta['member']}"] if "member" in meta else []
    details.append(f"iteration {meta['iteration']}" if "iteration" in meta else "iteration unknown")
    if "best_val_loss" in meta:
        details.append(f"best_val_loss {meta['best_val_loss']}")
    print(f"wrote {output} from {source.name}: {', '.join(details)}")


def export(
    namm_dir: Path = typer.Argument(
        ..., metavar="DIR", help="NAMM folder (namm.safetensors + namm_config.json).", show_default=False
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Checkpoint file to write, e.g. ckpt.pt.", show_default=False
    ),
    iteration: Optional[int] = typer.Option(
        None,
        "--iter",
        metavar="N",
        min=0,
        help="Iteration to record (default: the one recorded at conversion, else 0).",
        show_default=False,
    ),
    dense_covariance: bool = typer.Option(
        False,
        "--dense-covariance",
        help="Write the identity covariance (~66 MiB) so the reference can resume CMA-ES from it.",
    ),
) -> None:
    """Write a NAMM folder as a checkpoint the reference trainer can init_from."""
    with errors.user_errors():
        result = export_checkpoint(namm_dir, output, iter_num=iteration, dense_covariance=dense_covariance)
    covariance = "dense covariance" if dense_covariance else "placeholder covariance"
    print(f"wrote {result.path} from {namm_dir}: iteration {result.iteration}, {covariance}")
