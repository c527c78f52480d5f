"""Give mlx's Linux CPU build a fast BLAS before it loads.

The ``mlx[cpu]`` wheel bundles the reference BLAS, which multiplies float32
matrices about 30x slower than OpenBLAS. The dynamic linker only honours
``LD_PRELOAD`` when a process starts, so the ``namm`` command re-executes
itself once with Debian's OpenBLAS preloaded when that library is installed,
and otherwise prints one line saying how to install it. Nothing happens on
macOS (Metal), when ``LD_PRELOAD`` already holds an OpenBLAS, or with
``NAMM_OPENBLAS=0``.
"""

from __future__ import annotations

import os
import platform
import sys

#: Set in the re-executed process, so a preload that does not stick cannot loop.
REEXEC_GUARD = "NAMM_OPENBLAS_REEXEC"
#: Overrides the library path probed (tests point it at a missing file).
PATH_OVERRIDE = "NAMM_OPENBLAS_PATH"
#: ``0`` turns both the re-exec and the hint off.
SWITCH = "NAMM_OPENBLAS"


def openblas_path() -> str:
    """Where Debian's ``libopenblas0-pthread`` puts its BLAS for this machine."""
    default = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3"
    return os.environ.get(PATH_OVERRIDE) or default


def preloads_openblas(preload: str, library: str) -> bool:
    """True if ``LD_PRELOAD`` (colon- or space-separated) already names an OpenBLAS."""
    for entry in preload.replace(" ", ":").split(":"):
        if entry and ("openblas" in os.path.basename(entry).lower() or entry == library):
            return True
    return False


def hint(library: str) -> str:
    return (
        f"note: OpenBLAS not found at {library}; mlx's bundled BLAS makes every matmul ~30x slower. "
        "Install it with `sudo apt-get install libopenblas0-pthread` and namm will preload it itself "
        f"(silence this with {SWITCH}=0)"
    )


def ensure_openblas() -> None:
    """Re-execute this process once with OpenBLAS preloaded, or print the hint.

    Returns normally when nothing is to be done; otherwise replaces the
    process (``os.execve``) with the same command line and environment plus
    ``LD_PRELOAD``.
    """
    if not sys.platform.startswith("linux") or os.environ.get(SWITCH) == "0":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    library = openblas_path()
    if os.environ.get(REEXEC_GUARD) or preloads_openblas(preload, library):
        return
    if not os.path.isfile(library):
        print(hint(library), file=sys.stderr)
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [library, preload])), **{REEXEC_GUARD: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
