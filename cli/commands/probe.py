"""``namm probe``: give a NAMM a key probe that keeps the tokens readers ask about.

Thin wrapper over :mod:`namm_mlx.key_probe`: builds training documents from
the offline texts (never with the evaluation's seed), reads each once through
the full cache, labels its answer's tokens, fits one probe per layer and KV
head, and writes a copy of the NAMM with the probe beside its weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from namm_mlx.config import KEY_PROBE_HEADS, KEY_PROBE_LAYERS
from namm_mlx.integration import DEFAULT_NAMM_DIR

from ..errors import user_errors
from .distill import DistillError, _ints, _reporter, training_items, training_tasks

#: Tasks whose answers are spans of the document (the kjv verse's answer is a
#: whole verse: its keys look like every other verse's, see docs/results.md).
DEFAULT_TASKS = "needle,passkey,multi_needle,chapter"


def probe(
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="NAMM folder to write.", show_default=False),
    namm: Path = typer.Option(DEFAULT_NAMM_DIR, "--namm", metavar="DIR", help="NAMM to add the probe to."),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="M", help="Language model whose keys are probed (default: the embedded SmolLM2).",
        show_default=False,
    ),
    tasks: str = typer.Option(DEFAULT_TASKS, "--tasks", help="Training document tasks (comma-separated)."),
    lengths: str = typer.Option("2048", "--lengths", help="Document lengths in tokens (comma-separated)."),
    items: int = typer.Option(4, "--items", min=1, help="Documents per task and length (fact depths vary by item)."),
    seed: int = typer.Option(1000, "--seed", help="Seed of the training documents (namm eval uses 0)."),
    text: Optional[List[Path]] = typer.Option(
        None, "--text", metavar="FILE", help="Text file(s) to build documents from (repeatable).", show_default=False,
    ),
    marked_share: float = typer.Option(
        0.02, "--marked-share", min=0.0, max=1.0,
        help="Share of the training tokens the probe marks (kept ahead of the NAMM's own ranking).",
    ),
    span: int = typer.Option(
        0, "--span", min=0, max=4096,
        help="Also keep the N tokens before each marked one (the words that introduce a fact).",
    ),
    budget_share: float = typer.Option(
        1.0, "--budget-share", min=0.0, max=1.0,
        help="Marked tokens take at most this share of the kept tokens (surest first): of a fixed budget, "
             "or at the threshold, of the BAM's own count plus the marks.",
    ),
    heads: str = typer.Option(
        "own", "--heads", metavar="own|mean|max",
        help="Whose probe scores mark a token in a KV head: the head's own, or the mean or max over its layer's heads.",
    ),
    layers: str = typer.Option(
        "own", "--layers", metavar="own|mean",
        help="Which layers' probes mark a token: the layer's own, or the mean over it and the layers below "
             "(needs --heads mean or max).",
    ),
) -> None:
    """Fit a per-layer key probe on training documents and write the NAMM with it."""
    from namm_mlx import NAMM
    from namm_mlx.distill.record import item_tokens
    from namm_mlx.eval.facts import answer_positions
    from namm_mlx.key_probe import document_features, fit_probe
    from namm_mlx.models import load_model

    with user_errors():
        task_names = training_tasks(tasks, seed)
        if not 0.0 < budget_share <= 1.0:
            raise DistillError(f"--budget-share must be above 0 and at most 1, got {budget_share}")
        if not 0.0 < marked_share < 1.0:
            raise DistillError(f"--marked-share must be between 0 and 1 (exclusive), got {marked_share}")
        if heads not in KEY_PROBE_HEADS:
            raise DistillError(f"--heads must be own, mean or max, got {heads!r}")
        if layers not in KEY_PROBE_LAYERS:
            raise DistillError(f"--layers must be own or mean, got {layers!r}")
        if layers == "mean" and heads == "own":
            raise DistillError("--layers mean needs --heads mean or max: a token's mark is taken once, as it enters the cache")
        doc_lengths = _ints(lengths, "--lengths")
        base = NAMM.load(namm)
        lm, tokenizer = load_model(model, dtype="float32")
        wanted = training_items(task_names, doc_lengths, items, seed, text, tokenizer)
        documents = []
        line, update = _reporter("reading", len(wanted))
        try:
            for item in wanted:
                tokens, doc_length = item_tokens(tokenizer, item, base.config.hop)
                document = tokens[:doc_length]
                labels = np.zeros(doc_length, bool)
                labels[answer_positions(tokenizer, document, [str(a) for a in item["answers"]])] = True
                documents.append((document_features(lm, document), labels))
                update(len(documents), item["_id"])
        finally:
            line.close()
        if not any(labels.any() for _, labels in documents):
            raise DistillError("no training document holds its answer's tokens; try other --tasks")
        weights = fit_probe(documents, marked_share)
        provenance = {
            "key_probe": json.dumps(
                {"model": model or "default", "base_namm": str(namm), "tasks": task_names, "lengths": doc_lengths,
                 "items": items, "seed": seed, "marked_share": marked_share, "span": span,
                 "budget_share": budget_share, "heads": heads, "layers": layers,
                 "documents": [item["_id"] for item in wanted]},
                sort_keys=True,
            )
        }
        config = dataclasses.replace(base.config, key_probe_span=span, key_probe_share=budget_share, key_probe_heads=heads,
                                     key_probe_layers=layers)
        probed = NAMM(base.weights, base.norm_mean, base.norm_var, config, base.norm_count, base.metadata, weights)
        probed.save(out, metadata=provenance)
        print(f"wrote {out}: {namm} with a key probe ({weights.shape[0]} layers x {weights.shape[1]} KV heads) "
              f"fitted on {len(documents)} documents")
