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
    assert {"default", "distilled-future", "facts-first", "full-bam"} <= {p.name for p in FOLDERS}


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


def test_the_default_is_the_full_bam_namm_with_a_bam_window():
    default, full = NAMM.load(WEIGHTS / "default"), NAMM.load(WEIGHTS / "full-bam")
    assert default.config.bam_window == 128 and full.config.bam_window == 0
    assert np.array_equal(np.array(default.key_probe), np.array(full.key_probe))
    assert default.config.key_probe_span == full.config.key_probe_span
    # the same probe, its marks pooled over each layer's heads, in less of the budget
    assert default.config.key_probe_heads == "max" and full.config.key_probe_heads == "own"
    assert default.config.key_probe_share == 0.3 and full.config.key_probe_share == 0.5
    # the newest query's attention reorders the BAM's ranking; the reference BAM alone in full-bam
    assert default.config.newest_query_weight == 0.3 and full.config.newest_query_weight == 0.0
    # a layer marks by the mean of its probe and the ones below, which marks few enough tokens that
    # the floor session 18 gave the marks in the text read has nothing left to lift
    assert default.config.key_probe_layers == "mean" and full.config.key_probe_layers == "own"
    assert default.config.key_probe_document_share == 0.0 == full.config.key_probe_document_share
    assert default.metadata["method"] == "distilled" and default.metadata["evolved_generations"] == "0"
