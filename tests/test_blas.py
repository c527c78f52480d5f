"""The ``namm`` command preloads OpenBLAS on Linux, or says how to get it.

Every test runs the real console script as a subprocess with ``LD_PRELOAD``
unset. What the final process looked like (after any re-exec) is reported by
a ``sitecustomize`` module put on its path: at exit it writes its
``LD_PRELOAD``, the BLAS libraries mapped into it, and optionally the
speed of a float32 matmul (measured when it starts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.blas import REEXEC_GUARD, openblas_path, preloads_openblas

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")

REPORTER = textwrap.dedent(
    """
    import atexit, json, os, time

    def _gflops():
        # Measured at start-up: mlx work inside an atexit handler crashes mlx.
        import mlx.core as mx
        a = mx.random.normal((512, 512))
        mx.eval(a @ a)
        start = time.perf_counter()
        for _ in range(8):
            mx.eval(a @ a)
        return 8 * 2 * 512**3 / (time.perf_counter() - start) / 1e9

    def _report(out):
        with open("/proc/self/maps") as maps:
            out["blas_mapped"] = sorted({line.split()[-1] for line in maps if "blas" in line.split()[-1]})
        with open(os.environ["REPORT_FILE"], "w") as fh:
            json.dump(out, fh)

    if os.environ.get("REPORT_FILE"):
        out = {"preload": os.environ.get("LD_PRELOAD"), "guard": os.environ.get("%s")}
        if os.environ.get("REPORT_MATMUL"):
            out["gflops"] = _gflops()
        atexit.register(_report, out)
    """
    % REEXEC_GUARD
)


def _namm() -> list[str]:
    script = Path(sys.executable).with_name("namm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def run_namm(tmp_path: Path, *args: str, matmul: bool = False, **env_extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(REPORTER)
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_GUARD, "NAMM_OPENBLAS", "NAMM_OPENBLAS_PATH")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO_ROOT)]), REPORT_FILE=str(report), **env_extra)
    if matmul:
        env["REPORT_MATMUL"] = "1"
    proc = subprocess.run([*_namm(), *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc, json.loads(report.read_text())


needs_openblas = pytest.mark.skipif(
    not os.path.isfile(openblas_path()), reason="needs Debian's libopenblas0-pthread (.ci/run installs it)"
)


@needs_openblas
def test_namm_reexecutes_itself_with_openblas_and_is_fast(tmp_path):
    fast, seen = run_namm(tmp_path, "--help", matmul=True)
    assert seen["preload"] == openblas_path() and seen["guard"] == "1"
    assert openblas_path() in seen["blas_mapped"]
    assert fast.stdout.count("Usage:") == 1 and "OpenBLAS" not in fast.stderr

    slow, bundled = run_namm(tmp_path, "--help", matmul=True, NAMM_OPENBLAS_PATH=str(tmp_path / "missing.so.3"))
    assert bundled["preload"] is None and openblas_path() not in bundled["blas_mapped"]
    # mlx's bundled BLAS is ~30x slower on float32 matmuls; 4x leaves room for a busy machine.
    assert seen["gflops"] > 4 * bundled["gflops"], (seen["gflops"], bundled["gflops"])


def test_missing_openblas_prints_one_hint_with_the_fix(tmp_path):
    proc, seen = run_namm(tmp_path, "--help", NAMM_OPENBLAS_PATH=str(tmp_path / "missing.so.3"))
    hints = [line for line in proc.stderr.splitlines() if "OpenBLAS" in line]
    assert len(hints) == 1 and "apt-get install libopenblas0-pthread" in hints[0]
    assert seen["preload"] is None and seen["guard"] is None
    assert proc.stdout.count("Usage:") == 1

    quiet, _ = run_namm(tmp_path, "--help", NAMM_OPENBLAS_PATH=str(tmp_path / "missing.so.3"), NAMM_OPENBLAS="0")
    assert "OpenBLAS" not in quiet.stderr


@needs_openblas
def test_reexec_happens_once_even_if_the_preload_is_not_recognised(tmp_path):
    # A library whose name does not say "openblas": only the guard stops a second exec.
    lib = tmp_path / "libfastblas.so.3"
    shutil.copy(openblas_path(), lib)
    proc, seen = run_namm(tmp_path, "--help", NAMM_OPENBLAS_PATH=str(lib))
    assert seen["preload"] == str(lib) and seen["guard"] == "1" and str(lib) in seen["blas_mapped"]
    assert proc.stdout.count("Usage:") == 1


@needs_openblas
def test_an_existing_openblas_preload_is_left_alone(tmp_path):
    proc, seen = run_namm(tmp_path, "--help", LD_PRELOAD=openblas_path())
    assert seen["guard"] is None and seen["preload"] == openblas_path()
    assert openblas_path() in seen["blas_mapped"]


def test_preload_detection():
    lib = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    assert preloads_openblas(lib, lib)
    assert preloads_openblas("/opt/libopenblasp-r0.3.so other.so", "/nope")
    assert not preloads_openblas("", lib) and not preloads_openblas("/usr/lib/libjemalloc.so", lib)
