"""Every NAMM folder under weights/ loads, says how it was made, and scores a step."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from namm_mlx import NAMM

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
FOLDERS = sorted(p for p in WEIGHTS.iterdir() if (p / "namm_config.json").exists())


def test_the_default_and_its_alternatives_are_shipped():
    assert {"default", "distilled-future", "facts-first", "fast"} <= {p.name for p in FOLDERS}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_a_shipped_namm_loads_documents_itself_and_scores(folder):
    namm = NAMM.load(folder)
    assert namm.to_flat().shape == (namm.config.param_size,)
    assert (folder / "README.md").read_text().startswith("# ")
    rng = np.random.default_rng(0)
    attn = mx.array(np.tril(rng.random((1, 3, 64, 64))).astype(np.float32) / 64)
    positions = mx.broadcast_to(mx.arange(64)[None, None], (1, 3, 64))
    scores = np.array(namm.score(attn, positions)[0])
    assert scores.shape == (1, 3, 64) and np.isfinite(scores).all()


def test_the_fast_namm_is_the_windowed_bam_under_the_defaults_probe():
    fast, default = NAMM.load(WEIGHTS / "fast"), NAMM.load(WEIGHTS / "default")
    assert fast.config.bam_window == 128 and default.config.bam_window == 0
    assert np.array_equal(np.array(fast.key_probe), np.array(default.key_probe))
    assert fast.config.key_probe_span == default.config.key_probe_span
    assert fast.config.key_probe_share == default.config.key_probe_share
    assert fast.metadata["method"] == "distilled" and fast.metadata["evolved_generations"] == "0"
