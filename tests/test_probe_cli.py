"""``namm probe`` end to end: a real process, the real default model, a probed NAMM that loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_process import REPO, TEXT, assert_one_line_error, run_namm
from namm_mlx.namm import NAMM

DEFAULT = REPO / "weights" / "default"


@pytest.mark.real_model
def test_probe_writes_the_default_namm_with_a_probe_for_every_layer(tmp_path):
    result = run_namm("probe", "--out", str(tmp_path / "p"), "--text", str(TEXT), "--tasks", "passkey,needle",
                      "--lengths", "512", "--items", "1", "--marked-share", "0.05", "--span", "4", "--budget-share", "0.5",
                      "--heads", "mean", "--layers", "mean", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    probed, base = NAMM.load(tmp_path / "p"), NAMM.load(DEFAULT)
    assert probed.key_probe.shape == (30, 3, 33)  # SmolLM2-135M: 30 layers, 3 KV heads of dimension 64
    assert np.isfinite(np.array(probed.key_probe)).all()
    np.testing.assert_array_equal(probed.to_flat(), base.to_flat())  # the BAM is the base NAMM's
    assert probed.config.key_probe_span == 4 and probed.config.key_probe_share == 0.5
    assert probed.config.key_probe_heads == "mean" and base.config.key_probe_heads == "max"  # the flag, not the base's
    assert probed.config.key_probe_layers == "mean"
    assert probed.config.bam_window == base.config.bam_window == 128  # the base NAMM's window is kept
    provenance = json.loads((tmp_path / "p" / "namm_config.json").read_text())["provenance"]
    data = json.loads(provenance["key_probe"])
    assert data["documents"] == ["passkey-512-000-s1000", "needle-512-000-s1000"] and data["marked_share"] == 0.05


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "0"], "seed 0"),
        (["--tasks", "nope"], "unknown task"),
        (["--marked-share", "1"], "--marked-share"),
        (["--budget-share", "0"], "--budget-share"),
        (["--heads", "all"], "--heads must be own, mean or max"),
        (["--layers", "all"], "--layers must be own or mean"),
        (["--layers", "mean", "--heads", "own"], "--layers mean needs --heads mean or max"),
        (["--namm", "no/such/folder"], "no NAMM folder"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(tmp_path, args, message):
    result = run_namm("probe", "--out", str(tmp_path / "p"), "--text", str(TEXT), *args, cwd=tmp_path)
    assert_one_line_error(result, message)
    assert not (tmp_path / "p").exists()
