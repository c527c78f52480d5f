"""Where namm-mlx keeps what it downloads and converts (models, texts, locks)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The per-user cache root.

    ``$NAMM_MLX_CACHE``, else ``$XDG_CACHE_HOME/namm-mlx``, else ``~/.cache/namm-mlx``.
    """
    if os.environ.get("NAMM_MLX_CACHE"):
        return Path(os.environ["NAMM_MLX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "namm-mlx"


__all__ = ["cache_dir"]
