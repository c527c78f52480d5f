"""End-to-end tests of ``namm convert`` / ``namm export`` through the real console script.

Every command runs as a subprocess, as a user would run it: what is checked is the
folder it writes, its exit code and its stderr (one ``error:`` line, never a traceback).
Golden data: tests/fixtures/namm-reference (written by the original PyTorch code).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from namm_mlx import NAMM
from namm_mlx.checkpoint import read_reference_checkpoint
from namm_mlx.features import gqa_mean

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("tiny", "llama3_8b")
EXPECTED_KEYS = (
    "param_vector",
    "bam.attn.qkv.weight_in_out",
    "bam.attn.qkv.bias",
    "bam.attn.out.weight_in_out",
    "bam.attn.out.bias",
    "bam.mlp.weight_in_out",
    "bam.mlp.bias",
    "norm.mean",
    "norm.var",
    "norm.count",
)


def _command() -> list[str]:
    """The venv's ``namm`` console script, else the same entry point via ``-c``.

    (``python -m cli.main`` would not do: there ``app`` lives in ``__main__`` while the
    command modules register on ``cli.main.app``, a second copy of the module.)"""
    script = Path(sys.executable).with_name("namm")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cli.main import app; app(prog_name='namm')"]


def namm(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed ``namm`` CLI (or ``python -m cli.main``) with ``args``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*_command(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def weights(folder: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    return mx.load(str(folder / "namm.safetensors"), return_metadata=True)


def assert_same_namm(a: Path, b: Path, count: bool = True) -> None:
    """Same flat vector, buffers and config (bit for bit)."""
    first, second = NAMM.load(a), NAMM.load(b)
    np.testing.assert_array_equal(first.to_flat(), second.to_flat())
    np.testing.assert_array_equal(np.asarray(first.norm_mean), np.asarray(second.norm_mean))
    np.testing.assert_array_equal(np.asarray(first.norm_var), np.asarray(second.norm_var))
    if count:
        np.testing.assert_array_equal(first.norm_count, second.norm_count)
    assert first.config == second.config


@pytest.fixture(scope="module")
def converted(reference_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both fixture checkpoints converted once with the default member."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for shape in SHAPES:
        out[shape] = root / shape
        stdout = ok(namm("convert", reference_dir / f"checkpoint_{shape}.pt", "-o", out[shape], cwd=root))
        assert stdout.count("\n") == 1 and "member mean" in stdout and "iteration 360" in stdout
    return out


# ------------------------------------------------------------------ 1. fixture checkpoints
@pytest.mark.parametrize("shape", SHAPES)
def test_convert_yields_expected_conversion(converted: dict[str, Path], reference_dir: Path, shape: str) -> None:
    expected = mx.load(str(reference_dir / f"expected_conversion_{shape}.safetensors"))
    assert set(expected) == set(EXPECTED_KEYS)
    written, _ = weights(converted[shape])
    for key in EXPECTED_KEYS:
        assert key in written, key
        assert written[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(np.asarray(written[key]), np.asarray(expected[key]), err_msg=key)


def test_member_best_and_provenance(converted: dict[str, Path], reference_dir: Path, tmp_path: Path) -> None:
    source = reference_dir / "checkpoint_tiny.pt"
    best = tmp_path / "best"
    stdout = ok(namm("convert", source, "-o", best, "--member", "best", cwd=tmp_path))
    assert "member best" in stdout and "iteration 360" in stdout
    expected = mx.load(str(reference_dir / "expected_conversion_tiny.safetensors"))
    written, meta = weights(best)
    for key in EXPECTED_KEYS:  # the fixture's best_member and best_ buffers equal the mean's
        np.testing.assert_array_equal(np.asarray(written[key]), np.asarray(expected[key]), err_msg=key)
    assert meta["member"] == "best"

    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    for folder, member in ((converted["tiny"], "mean"), (best, "best")):
        _, meta = weights(folder)
        provenance = json.loads((folder / "namm_config.json").read_text())["provenance"]
        for record in (meta, provenance):
            assert record["source"] == "checkpoint_tiny.pt"
            assert record["source_sha256"] == sha
            assert record["iteration"] == "360"
            assert record["member"] == member
            assert float(record["best_val_loss"]) == 0.5
            assert record["converter"].startswith("namm-mlx ")
        assert NAMM.load(folder).metadata["source_sha256"] == sha

    # Converting again into an existing NAMM folder replaces it.
    ok(namm("convert", source, "-o", best, cwd=tmp_path))
    assert weights(best)[1]["member"] == "mean"


# ------------------------------------------------------------------ 2. reference trajectory
def test_converted_tiny_reproduces_trajectory_call0(converted: dict[str, Path], reference_dir: Path) -> None:
    model = NAMM.load(converted["tiny"])
    data = np.load(reference_dir / "tiny_trajectory.npz")
    for layer in range(2):
        prefix = f"call0.layer{layer}."
        attn = gqa_mean(mx.array(data[prefix + "in.attn_weights"]), 2, "float32")
        positions = mx.array(data[prefix + "policy_position_ids"])
        result = model.step(attn, positions)
        expected = data[prefix + "token_scores"]
        atol = max(1e-5, 1e-6 * float(np.abs(expected).max()))
        np.testing.assert_allclose(np.asarray(result.scores), expected, rtol=1e-4, atol=atol)
        np.testing.assert_array_equal(np.asarray(result.kept), data[prefix + "retained_idxs"])


# ------------------------------------------------------------------ 3. round trip
def test_convert_export_convert_round_trip(converted: dict[str, Path], tmp_path: Path) -> None:
    exported = tmp_path / "ckpt.pt"
    stdout = ok(namm("export", converted["tiny"], "-o", exported, cwd=tmp_path))
    assert stdout.count("\n") == 1 and "iteration 360" in stdout
    again = tmp_path / "again"
    ok(namm("convert", exported, "-o", again, cwd=tmp_path))
    assert_same_namm(converted["tiny"], again)
    meta = NAMM.load(again).metadata
    assert meta["iteration"] == "360" and float(meta["best_val_loss"]) == 0.5

    # --iter overrides the recorded iteration.
    ok(namm("export", again, "-o", exported, "--iter", 7, cwd=tmp_path))
    assert read_reference_checkpoint(exported).iter_num == 7


# ------------------------------------------------------------------ 5. flat inputs
def test_flat_vector_inputs_match_checkpoint(converted: dict[str, Path], reference_dir: Path, tmp_path: Path) -> None:
    expected_file = reference_dir / "expected_conversion_tiny.safetensors"
    expected = {k: np.asarray(v) for k, v in mx.load(str(expected_file)).items()}
    vector = tmp_path / "vector.npy"
    np.save(vector, expected["param_vector"])
    norm_npz = tmp_path / "norm.npz"
    np.savez(norm_npz, mean=expected["norm.mean"], var=expected["norm.var"])
    norm_st = tmp_path / "norm.safetensors"
    mx.save_safetensors(str(norm_st), {k: mx.array(expected[k]) for k in ("norm.mean", "norm.var", "norm.count")})
    named = tmp_path / "named.safetensors"  # the six weights only, no param_vector
    mx.save_safetensors(str(named), {k: mx.array(v) for k, v in expected.items() if k != "param_vector"})

    cases = {
        "npy_npz": (vector, "--norm", norm_npz),
        "npy_safetensors": (vector, "--norm", norm_st),
        "expected_file": (expected_file,),
        "named_weights": (named,),
    }
    for name, args in cases.items():
        out = tmp_path / name
        stdout = ok(namm("convert", *args, "-o", out, cwd=tmp_path))
        assert stdout.count("\n") == 1, name
        assert_same_namm(converted["tiny"], out, count=name != "npy_npz")
        assert NAMM.load(out).metadata["source_sha256"] == hashlib.sha256(Path(args[0]).read_bytes()).hexdigest()


# ------------------------------------------------------------------ 4. errors
class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _malicious_checkpoint(path: Path, marker: Path) -> None:
    """A torch-style zip whose data.pkl runs a shell command when unpickled naively."""
    payload = pickle.dumps({"evolution_state": _Evil(f"touch {marker}")}, protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{path.stem}/data.pkl", payload)
        archive.writestr(f"{path.stem}/version", "3\n")


def test_errors_are_one_line_without_traceback(reference_dir: Path, tmp_path: Path) -> None:
    tiny = reference_dir / "checkpoint_tiny.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _malicious_checkpoint(evil, marker)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(4171, np.float32))
    vector = tmp_path / "vector.npy"
    np.save(vector, np.zeros(4172, np.float32))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")

    out = tmp_path / "out"
    cases = [
        (("convert", tmp_path / "missing.pt", "-o", out), ["not found", "missing.pt"]),
        (("convert", truncated, "-o", out), ["truncated"]),
        (("convert", garbage, "-o", out), ["not a torch checkpoint"]),
        (("convert", evil, "-o", out), ["refused"]),
        (("convert", short, "-o", out), ["4,172", "4,171", "bam.attn.qkv.weight_in_out 25x96"]),
        (("convert", vector, "-o", out), ["missing normalisation buffers", "--norm"]),
        (("convert", tiny, "-o", occupied), ["not empty"]),
        (("export", tmp_path / "no-such-namm", "-o", tmp_path / "x.pt"), ["no NAMM folder"]),
    ]
    for args, fragments in cases:
        result = namm(*args, cwd=tmp_path)
        label = f"namm {' '.join(map(str, args))}"
        assert result.returncode != 0, label
        assert "Traceback" not in result.stdout + result.stderr, label
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{label}: {result.stderr!r}"
        for fragment in fragments:
            assert fragment in lines[0], f"{label}: {lines[0]!r} lacks {fragment!r}"
    assert not marker.exists(), "the malicious pickle ran its payload"
    assert not out.exists(), "a failed conversion left an output folder behind"
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]
