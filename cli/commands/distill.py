"""``namm distill``: a NAMM fitted by gradient to recorded future attention (a warm start for evolution).

Thin wrapper over :mod:`namm_mlx.distill`: builds training documents from the
offline texts (never with the evaluation's seed), records them once into a
reusable folder, fits, and writes a normal NAMM folder with its provenance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer

from namm_mlx.config import NAMMConfig
from namm_mlx.distill import DistillOptions, ItemRecord, fit_namm, record_item
from namm_mlx.distill.fit import LOSSES, TARGETS
from namm_mlx.errors import NammError
from namm_mlx.eval.tasks import TASK_NAMES
from namm_mlx.progress import StatusLine, format_duration, remaining

from ..errors import user_errors

DEFAULT_TASKS = ",".join(TASK_NAMES)
#: ``namm eval`` builds its items with seed 0; training documents must differ.
EVAL_SEED = 0


class DistillError(NammError, ValueError):
    """Distillation cannot run as asked; the message says why."""


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DistillError(f"{name} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise DistillError(f"{name} expects positive integers, got {text!r}")
    return values


def training_tasks(tasks: str, seed: int) -> list[str]:
    """The task names of ``--tasks``, refused in one line when the seed is the
    evaluation's (training on the items a table scores would flatter it) or a
    name is unknown."""
    if seed == EVAL_SEED:
        raise DistillError("seed 0 builds namm eval's items; train on other documents (--seed 1000)")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = sorted(set(names) - set(TASK_NAMES))
    if unknown:
        raise DistillError(f"unknown task {unknown[0]!r}; known: {', '.join(TASK_NAMES)}")
    return names


def training_items(tasks: list[str], lengths: list[int], n: int, seed: int, texts, tokenizer) -> list[dict]:
    """Training documents built from ``--text`` files, else the offline texts
    (the KJV only when a task needs it, so other tasks run without it)."""
    from namm_mlx.eval.tasks import TextSource, make_items

    source = TextSource.from_files(texts) if texts else TextSource.from_cache(kjv="kjv_verse" in tasks)
    return make_items(tasks, lengths, n, seed, source, tokenizer)


def _reporter(what: str, total: int) -> tuple[StatusLine, Callable[[int, str], None]]:
    """A status line and ``update(done, info)`` printing ``what done/total info elapsed<eta``."""
    line, start = StatusLine(), time.perf_counter()

    def update(done: int, info: str) -> None:
        elapsed = time.perf_counter() - start
        eta = remaining(elapsed, done, total)
        line.show(f"{what} {done}/{total} {info} {format_duration(elapsed)}<{format_duration(eta)}")

    return line, update


def distill(
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="NAMM folder to write.", show_default=False),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="M", help="Language model to record (default: the embedded SmolLM2).",
        show_default=False,
    ),
    tasks: str = typer.Option(DEFAULT_TASKS, "--tasks", help="Training document tasks (comma-separated)."),
    lengths: str = typer.Option("2048,3072", "--lengths", help="Document lengths in tokens (comma-separated)."),
    items: int = typer.Option(
        5, "--items", min=1,
        help="Documents per task and length; item i places its fact at depth 0.1, 0.5, 0.9, 0.3 or 0.7 "
        "(i mod 5), so 5 covers every depth.",
    ),
    seed: int = typer.Option(1000, "--seed", help="Seed of the training documents (namm eval uses 0)."),
    text: Optional[List[Path]] = typer.Option(
        None, "--text", metavar="FILE",
        help="Text file(s) to build documents from (repeatable; default: the texts of namm data fetch).",
        show_default=False,
    ),
    layer_stride: int = typer.Option(2, "--layer-stride", min=1, help="Record every K-th layer."),
    records: Optional[Path] = typer.Option(
        None, "--records", metavar="DIR",
        help="Folder of recordings, reused across runs (default: OUT-records beside --out).", show_default=False,
    ),
    target: str = typer.Option(
        "question", "--target",
        help=f"Attention to regress onto: {', '.join(TARGETS)} ('question': the question and answer queries' "
        "mean, what keeps the facts readers ask about; 'mixed': the later document queries' mean mixed with "
        "the question's by --question-weight).",
    ),
    question_weight: float = typer.Option(0.5, "--question-weight", min=0.0, max=1.0),
    loss: str = typer.Option("mse", "--loss", help=f"Regression loss: {', '.join(LOSSES)}."),
    steps: int = typer.Option(400, "--steps", min=0, help="Adam steps."),
    learning_rate: float = typer.Option(3e-3, "--learning-rate", min=0.0),
    window: int = typer.Option(1024, "--window", min=16, help="Tokens per gradient step (a random window)."),
    keep: float = typer.Option(
        0.5, "--keep", min=0.0, max=1.0, help="Share of recorded tokens that threshold 0 keeps (calibration)."
    ),
    fit_seed: int = typer.Option(0, "--fit-seed", min=0, help="Seed of the initial weights and batches."),
    recency: bool = typer.Option(
        True, "--recency/--no-recency",
        help="Let the scorer read each token's age (--no-recency: judged by its attention alone).",
    ),
    key_norm: bool = typer.Option(
        False, "--key-norm",
        help="Give the scorer each token's key norm as one more input (not in the reference; the NAMM records it).",
    ),
    bam_window: int = typer.Option(
        0, "--bam-window", min=0, metavar="W",
        help="Each token's BAM attention sees only the W tokens from it on (0: every newer token, as the reference). "
        "A step then costs N x W instead of N^2 / 2; the NAMM records it.",
    ),
    recorded_only: bool = typer.Option(
        False, "--recorded-only",
        help="Fit on the recordings already in --records (no model, no new recording): for trying fit options.",
    ),
) -> None:
    """Distil a NAMM from full-cache attention: record documents once, fit by gradient, calibrate."""
    with user_errors():
        task_names = training_tasks(tasks, seed)
        doc_lengths = _ints(lengths, "--lengths")
        try:
            options = DistillOptions(
                target=target, question_weight=question_weight, loss=loss, steps=steps,
                learning_rate=learning_rate, seed=fit_seed, keep=keep, window=window, recency=recency,
            )
        except ValueError as err:
            raise DistillError(str(err)) from None
        folder = records or out.with_name(out.name + "-records")
        if recorded_only:
            recorded = [ItemRecord.load(p) for p in sorted(folder.glob("*.npz"))]
            if not recorded:
                raise DistillError(f"--recorded-only: no recordings (*.npz) in {folder}")
        else:
            recorded = _record(model, task_names, doc_lengths, items, seed, layer_stride, folder, text, key_norm)
        if key_norm and not all(r.has_key_norm for r in recorded):
            raise DistillError(f"--key-norm: the recordings in {folder} hold no key norms (made by an older namm distill); record them again")
        line, update = _reporter("fitting", options.steps)
        try:
            namm = fit_namm(
                recorded,
                options,
                config=NAMMConfig(key_norm_input=key_norm, bam_window=bam_window),
                progress=lambda done, total, loss: update(done, f"loss {loss:.4f}"),
                metadata={
                    "distill_data": json.dumps(
                        {"model": model or "default", "records": str(folder), "recorded_only": recorded_only,
                         **({} if recorded_only else {"tasks": task_names, "lengths": doc_lengths, "items": items,
                                                      "seed": seed, "layer_stride": layer_stride}),
                         "documents": [r.item_id for r in recorded]},
                        sort_keys=True,
                    ),
                },
            )
        finally:
            line.close()
        namm.save(out)
        print(f"wrote {out}: distilled from {len(recorded)} documents ({target} target, {loss}, {steps} steps)")


def _record(model, tasks, lengths, n, seed, stride, folder: Path, texts, key_norm: bool = False) -> list[ItemRecord]:
    """Record every training document not already in ``folder`` (again when a
    key-norm fit finds one recorded without key norms)."""
    from namm_mlx.models import load_model

    folder.mkdir(parents=True, exist_ok=True)
    lm, tokenizer = load_model(model, dtype="float32")
    layers = list(range(0, len(lm.layers), stride))
    wanted = training_items(tasks, lengths, n, seed, texts, tokenizer)
    result = []
    line, update = _reporter("recording", len(wanted))
    try:
        for item in wanted:
            path = folder / f"{item['_id']}-l{stride}.npz"
            record = ItemRecord.load(path) if path.is_file() else None
            if record is None or (key_norm and not record.has_key_norm):
                record = record_item(lm, tokenizer, item, layers=layers)
                record.save(path)
            result.append(record)
            update(len(result), item["_id"])
    finally:
        line.close()
    return result
