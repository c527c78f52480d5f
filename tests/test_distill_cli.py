"""``namm distill`` end to end: a real process, the real default model, a NAMM folder that loads."""

from __future__ import annotations

import json

import pytest

from cli_process import TEXT, assert_one_line_error, run_namm
from namm_mlx.namm import NAMM


@pytest.mark.real_model
def test_distill_writes_a_namm_with_its_provenance_and_reuses_recordings(tmp_path):
    args = ["distill", "--out", str(tmp_path / "d"), "--text", str(TEXT), "--tasks", "passkey", "--lengths", "700",
            "--items", "1", "--steps", "3", "--window", "256", "--layer-stride", "15", "--keep", "0.4"]
    first = run_namm(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    namm = NAMM.load(tmp_path / "d")
    provenance = json.loads((tmp_path / "d" / "namm_config.json").read_text())["provenance"]
    assert provenance["method"] == "distilled"
    data = json.loads(provenance["distill_data"])
    assert data["documents"] == ["passkey-700-000-s1000"] and data["seed"] == 1000
    assert json.loads(provenance["distill_options"])["steps"] == 3
    assert namm.to_flat().shape == (4172,)
    records = list((tmp_path / "d-records").glob("*.npz"))
    assert len(records) == 1
    stamp = records[0].stat().st_mtime_ns
    again = run_namm(*args[:2], str(tmp_path / "e"), *args[3:], "--records", str(tmp_path / "d-records"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert records[0].stat().st_mtime_ns == stamp, "the recording is reused, not redone"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "0"], "seed 0"),
        (["--tasks", "nope"], "unknown task"),
        (["--target", "bogus"], "target must be"),
        (["--lengths", "a,b"], "--lengths"),
    ],
)
def test_bad_options_are_one_line(tmp_path, args, message):
    result = run_namm("distill", "--out", str(tmp_path / "d"), "--text", str(TEXT), *args, cwd=tmp_path)
    assert_one_line_error(result, message)


def test_recorded_only_fits_without_a_model_and_refuses_an_empty_folder(tmp_path):
    from namm_mlx.distill import StepRecord, ItemRecord
    import numpy as np

    rng = np.random.default_rng(0)
    steps = [
        StepRecord(0, 32, rng.random((2, 32, 17), dtype=np.float32), np.arange(32)[::-1][None].repeat(2, 0).astype(np.int32),
                   *(rng.random((2, 32), dtype=np.float32) / 32 for _ in range(3)))
    ]
    (tmp_path / "r").mkdir()
    ItemRecord("made-by-hand", 32, 40, steps).save(tmp_path / "r" / "a.npz")
    ok = run_namm("distill", "--out", str(tmp_path / "d"), "--records", str(tmp_path / "r"), "--recorded-only",
                  "--steps", "2", "--window", "16", "--bam-window", "8", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    config = json.loads((tmp_path / "d" / "namm_config.json").read_text())
    assert config["bam_window"] == 8  # the windowed BAM it was fitted as is the one it loads as
    data = json.loads(config["provenance"]["distill_data"])
    assert data["documents"] == ["made-by-hand"] and data["recorded_only"] is True
    (tmp_path / "empty").mkdir()
    empty = run_namm("distill", "--out", str(tmp_path / "e"), "--records", str(tmp_path / "empty"), "--recorded-only", cwd=tmp_path)
    assert empty.returncode != 0 and "no recordings" in empty.stderr and "Traceback" not in empty.stderr


def test_key_norm_and_no_recency_fits_from_recordings(tmp_path):
    from namm_mlx.distill import ItemRecord, StepRecord
    import numpy as np

    rng = np.random.default_rng(1)

    def step(key_norm):
        return StepRecord(0, 32, rng.random((2, 32, 17), dtype=np.float32), np.arange(32)[::-1][None].repeat(2, 0).astype(np.int32),
                          *(rng.random((2, 32), dtype=np.float32) / 32 for _ in range(3)), key_norm)

    for name, key_norm in (("with", rng.normal(size=(2, 32)).astype(np.float32)), ("without", None)):
        (tmp_path / name).mkdir()
        ItemRecord("by-hand", 32, 40, [step(key_norm)]).save(tmp_path / name / "a.npz")
    common = ["--recorded-only", "--steps", "2", "--window", "16"]
    ok = run_namm("distill", "--out", str(tmp_path / "kn"), "--records", str(tmp_path / "with"), "--key-norm", "--no-recency",
                  *common, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    namm = NAMM.load(tmp_path / "kn")
    assert namm.config.key_norm_input and namm.to_flat().shape == (namm.config.param_size,)
    assert not np.any(np.array(namm.weights.qkv_weight)[: namm.config.recency_dim])
    old = run_namm("distill", "--out", str(tmp_path / "old"), "--records", str(tmp_path / "without"), "--key-norm",
                   *common, cwd=tmp_path)
    lines = [l for l in old.stderr.splitlines() if l.strip()]
    assert old.returncode != 0 and len(lines) == 1 and "hold no key norms" in lines[0], old.stderr
    assert not (tmp_path / "old").exists()
