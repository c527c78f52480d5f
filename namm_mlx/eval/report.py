"""Summaries of ``predictions.jsonl``: per-task and overall rows with bootstrap
intervals, the text table, ``results.json`` and the score-vs-kept plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..files import atomic_write
from .bootstrap import bootstrap_interval
from .plan import PolicyRun, matched_budgets
from .store import PREDICTIONS, latest_records, pair_key, read_predictions

RESULTS = "results.json"
PLOT = "score_vs_kept.png"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _scored(rows: Sequence[Mapping[str, Any]], field: str) -> list[float]:
    return [float(r[field]) for r in rows if r.get(field) is not None]


def _interval(groups: Sequence[Sequence[float]], scale: float, digits: int) -> list[float] | None:
    ci = bootstrap_interval(groups)
    return None if ci is None else [round(scale * ci[0], digits), round(scale * ci[1], digits)]


def _recall_profile(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean recall per layer, and per eviction step when every item has the same
    number of steps (steps at 512, 1024, ... and the document's end): where a
    policy loses the attention that follows."""
    out: dict[str, Any] = {}
    layers = [r["recall_per_layer"] for r in rows if r.get("recall_per_layer")]
    if layers and len({len(v) for v in layers}) == 1:
        out["recall_per_layer"] = [round(float(v), 4) for v in np.mean(layers, axis=0)]
    steps = [r["recall_per_step"] for r in rows if r.get("recall_per_step")]
    if steps and len({len(v) for v in steps}) == 1:
        out["recall_per_step"] = [round(float(v), 4) for v in np.mean(steps, axis=0)]
    return out


def _aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One table row: the mean task score (100 x, with its 95% bootstrap interval),
    recall (with its interval, per layer and per step), kept fraction, memory
    and speed."""
    scores, recalls = _scored(rows, "score"), _scored(rows, "recall")
    prefill_s = sum(r["prefill_seconds"] for r in rows)
    decode_s = sum(r["generated_tokens"] / r["decode_tps"] for r in rows if r.get("decode_tps"))
    return {
        "n": len(scores),
        "score": round(100 * _mean(scores), 2) if scores else None,
        "score_ci": _interval([scores], 100, 2),
        "n_recall": len(recalls),
        "recall": round(_mean(recalls), 4) if recalls else None,
        "recall_ci": _interval([recalls], 1, 4),
        "recall_final": round(_mean(_scored(rows, "recall_final")), 4) if recalls else None,
        "kept_fraction": round(_mean([r["kept_fraction"] for r in rows]), 4),
        "peak_memory_gb": round(max(r["peak_memory_gb"] for r in rows), 3),
        "kv_cache_mb": round(_mean(_scored(rows, "kv_cache_mb")), 2) if _scored(rows, "kv_cache_mb") else None,
        "prefill_tps": round(sum(r["prompt_tokens"] - 1 for r in rows) / prefill_s, 1) if prefill_s else 0.0,
        "decode_tps": round(sum(r["generated_tokens"] for r in rows) / decode_s, 1) if decode_s else 0.0,
        **_recall_profile(rows),
    }


def summarize(records: Sequence[Mapping[str, Any]], runs: Sequence[PolicyRun] | None = None) -> dict[str, Any]:
    """Per task × run, per task × length × run and overall (mean over tasks) rows.

    Scores are 100 × the mean item score (LongBench's scale); every row carries
    a 95% percentile-bootstrap interval over its items (``score_ci``,
    ``recall_ci``; stratified by task for the overall rows)."""
    order = {r.label: i for i, r in enumerate(runs or [])}
    records = latest_records(records)

    def run_label(r: Mapping[str, Any]) -> str:
        return r["policy"] if r["budget"] == "-" else f"{r['policy']}@{r['budget']}"

    def sort_key(key: tuple) -> tuple:
        return (*key[:-1], order.get(key[-1], len(order)), key[-1])

    tasks: dict[tuple, list] = {}
    lengths: dict[tuple, list] = {}
    for r in records:
        tasks.setdefault((r["dataset"], run_label(r)), []).append(r)
        lengths.setdefault((r["dataset"], r.get("length") or 0, run_label(r)), []).append(r)

    def row(key: tuple, rows: list, names: tuple) -> dict[str, Any]:
        first = rows[0]
        return {**dict(zip(names, key)), "policy": first["policy"], "budget": first["budget"], **_aggregate(rows)}

    by_task = [row(k, tasks[k], ("task", "run")) for k in sorted(tasks, key=sort_key)]
    by_length = [row(k, lengths[k], ("task", "length", "run")) for k in sorted(lengths, key=sort_key)]
    overall = []
    per_run: dict[str, list] = {}
    for (task, label), rows in tasks.items():
        per_run.setdefault(label, []).append(rows)
    task_rows = {(t["task"], t["run"]): t for t in by_task}
    for label in sorted(per_run, key=lambda l: (order.get(l, len(order)), l)):
        groups = per_run[label]
        rows = [task_rows[(g[0]["dataset"], label)] for g in groups]
        scores = [t["score"] for t in rows if t["score"] is not None]
        recalls = [t["recall"] for t in rows if t["recall"] is not None]
        overall.append(
            {
                "run": label,
                "policy": rows[0]["policy"],
                "budget": rows[0]["budget"],
                "tasks": len(rows),
                "n": sum(t["n"] for t in rows),
                "score": round(_mean(scores), 2) if scores else None,
                "score_ci": _interval([_scored(g, "score") for g in groups], 100, 2),
                "n_recall": sum(t["n_recall"] for t in rows),
                "recall": round(_mean(recalls), 4) if recalls else None,
                "recall_ci": _interval([_scored(g, "recall") for g in groups], 1, 4),
                "kept_fraction": round(_mean([t["kept_fraction"] for t in rows]), 4),
                "peak_memory_gb": max(t["peak_memory_gb"] for t in rows),
                "prefill_tps": round(_mean([t["prefill_tps"] for t in rows]), 1),
                "decode_tps": round(_mean([t["decode_tps"] for t in rows]), 1),
            }
        )
    metrics = {r["dataset"]: r.get("metric") for r in records}
    return {"by_task": by_task, "by_length": by_length, "overall": overall, "metrics": metrics}


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ci_cell(ci: Sequence[float] | None, spec: str) -> str:
    return "-" if ci is None else f"{format(ci[0], spec)}-{format(ci[1], spec)}"


def format_table(summary: Mapping[str, Any]) -> str:
    """task × run table: score, mean kept fraction, the score's 95% interval,
    future-attention recall and its interval (when measured), peak memory,
    prefill/decode tok/s."""
    with_recall = any(t.get("recall") is not None for t in summary["by_task"])
    head = ("task", "policy", "budget", "n", "score", "kept", "score 95% CI")
    head += ("recall", "recall 95% CI") if with_recall else ()
    head += ("peak GB", "prefill tok/s", "decode tok/s")

    def cells(task: str, t: Mapping[str, Any]) -> tuple[str, ...]:
        row = (task, t["policy"], t["budget"], str(t["n"]), _cell(t["score"], ".2f"), f"{t['kept_fraction']:.3f}",
               _ci_cell(t.get("score_ci"), ".1f"))
        if with_recall:
            row += (_cell(t.get("recall"), ".3f"), _ci_cell(t.get("recall_ci"), ".3f"))
        return row + (f"{t['peak_memory_gb']:.2f}", f"{t['prefill_tps']:.1f}", f"{t['decode_tps']:.1f}")

    rows = [cells(t["task"], t) for t in summary["by_task"]]
    if len({t["task"] for t in summary["by_task"]}) > 1:
        rows += [cells("(mean)", o) for o in summary["overall"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def write_results(
    out_dir: str | Path,
    runs: Sequence[PolicyRun],
    items: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    baseline_eviction: str = "online",
    protocol: str = "agnostic",
    recall_only: bool = False,
) -> dict[str, Any]:
    """Recompute every summary from ``predictions.jsonl`` (only the pairs of this
    plan and protocol), write ``results.json`` and the score-vs-kept plot."""
    from .plot import plot_score_vs_kept, policy_color

    out = Path(out_dir)
    plan_keys = {pair_key(i, r, baseline_eviction, protocol, recall_only) for r in runs for i in items}
    records = latest_records(r for r in read_predictions(out / PREDICTIONS) if pair_key(r) in plan_keys)
    done = sum(1 for r in records if recall_only or r.get("score") is not None)
    summary = summarize(records, runs)
    kept = "of the document at its end" if protocol == "agnostic" else "at the end of the prompt"
    results = {
        "config": dict(config or {}),
        "protocol": protocol,
        "complete": done == len(plan_keys),
        "pairs": {"done": done, "planned": len(plan_keys)},
        "scale": (
            f"score = 100 x mean item score (LongBench); kept = mean kept fraction {kept}; "
            "recall = future-attention recall (mean over eviction steps); *_ci = 95% percentile bootstrap over items "
            "(2000 resamples, seed 0; stratified by task in 'overall')"
        ),
        "budgets": (
            "a fraction f keeps at most ceil(f x document tokens) tokens per layer after every step; kvN keeps N"
            if protocol == "agnostic"
            else "a fraction f keeps at most f x the tokens seen so far after every step; kvN keeps N tokens per layer"
        ),
        **summary,
        "matched_budgets": matched_budgets(records) if any(r.budget and r.budget.match for r in runs) else None,
        "legend": {p: policy_color(p) for p in dict.fromkeys(r.policy for r in runs)},
        "plot": PLOT,
    }
    plotted = plot_score_vs_kept([o for o in summary["overall"] if o["score"] is not None], out / PLOT)
    if not plotted:
        results["plot"] = None
    atomic_write(out / RESULTS, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
