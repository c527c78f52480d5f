"""Run evaluation items through every eviction policy and score the answers.

One loop serves the synthetic tasks and LongBench JSONL files. The NAMM runs
online, as it was trained: the prompt is prefilled through fresh caches from
``make_prompt_cache(model)`` after :func:`namm_mlx.attach` (aligned 512-token
chunks) and it evicts every 512 tokens. The answer is generated greedily with
stock ``mlx_lm.stream_generate`` until EOS or the task's ``max_tokens``.

Baselines have two schedules (``baseline_eviction``):

* ``"prompt"`` (default): each baseline compresses once, right after the
  prompt, with the whole prompt's attention in view (how kvpress applies its
  presses, and the strongest, question-aware setting for them). Since nothing is
  evicted before that point, one full-cache prefill per item serves the full
  cache and every baseline and budget: the caches are forked
  (:meth:`EvictingKVCache.fork`) and each fork runs its policy's ``evict_now``.
  The prefill runs an unbudgeted H2O scorer, which evicts nothing but sums the
  attention each token receives (what an H2O fork needs) and retains the last
  queries (what SnapKV's window and TOVA need). Their prefill tok/s and peak
  memory are therefore those of the shared full-cache prefill.
* ``"online"``: each baseline runs separately at the NAMM's 512-token cadence
  (SnapKV stays one-shot).

Every finished (item, run) pair is appended to ``predictions.jsonl`` at once, so
an interrupted run resumes where it stopped: pairs already in the file are
skipped (matched on item id, a hash of the item's content, the policy and the
budget label) and every summary is recomputed from the file.

Budgets: a kept fraction (the cache's ``keep_fraction``: after each eviction
step a layer keeps at most that share of the tokens seen) or an absolute size
(``max_kv_size`` tokens per layer). ``full`` and ``namm`` take no budget: the
NAMM decides how much to keep, and its mean kept fraction is reported.
``--match namm`` runs each baseline, per task and prompt length, at the NAMM's
mean kept fraction on those items: measured at the NAMM's last eviction step for the
periodic baselines (so their budget caps the same quantity), and at the end of
the prompt for one-shot baselines (which have no unevicted tail).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import mlx.core as mx
import numpy as np

from ..cache import EvictingKVCache, evict_now
from ..policies.baselines import H2OScorer
from ..prefill import prefill
from .metrics import max_new_tokens, metric_name, score_prediction
from .prompts import prompt_tokens

#: Policies that take no budget.
UNBUDGETED = ("full", "namm")
#: Policies compressed once after the prompt under the ``"online"`` schedule.
ONE_SHOT = ("snapkv",)
#: Baseline schedules: compress once after the prompt, or at the 512 cadence.
BASELINE_EVICTION = ("prompt", "online")
#: Prompt queries kept through the shared prefill (SnapKV's window, TOVA's last).
SHARED_QUERY_ROWS = 32
PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
PLOT = "score_vs_kept.png"


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message says why."""


# --------------------------------------------------------------------------- budgets and runs


@dataclass(frozen=True)
class Budget:
    """How much a baseline may keep: a fraction, an absolute size, or the NAMM's."""

    keep_fraction: float | None = None
    max_kv_size: int | None = None
    match: str | None = None

    @property
    def label(self) -> str:
        if self.match:
            return f"match:{self.match}"
        if self.max_kv_size is not None:
            return f"kv{self.max_kv_size}"
        return f"{self.keep_fraction:g}"


def parse_budgets(text: str | None) -> list[Budget]:
    """``"0.25,0.5"`` -> fractions; integers above 1 (``"1024"``) -> ``max_kv_size``."""
    budgets = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise EvalError(f"bad budget {part!r}: give a kept fraction in (0, 1] or a token count") from None
        if 0.0 < value <= 1.0:
            budgets.append(Budget(keep_fraction=value))
        elif value > 1 and value == int(value):
            budgets.append(Budget(max_kv_size=int(value)))
        else:
            raise EvalError(f"bad budget {part!r}: give a kept fraction in (0, 1] or a token count")
    return budgets


@dataclass(frozen=True)
class PolicyRun:
    """One policy at one budget (``budget`` is None for full and namm)."""

    policy: str
    budget: Budget | None = None

    @property
    def budget_label(self) -> str:
        return self.budget.label if self.budget else "-"

    @property
    def label(self) -> str:
        return self.policy if self.budget is None else f"{self.policy}@{self.budget.label}"


def plan_runs(policies: Sequence[str], budgets: Sequence[Budget], match: str | None = None) -> list[PolicyRun]:
    """Every (policy, budget) run, the NAMM first (``match`` needs its numbers).

    ``match="namm"`` adds a matched budget for every baseline (and the NAMM run
    if it was not asked for). Baselines with neither budgets nor ``match`` fail.
    """
    from ..policies import POLICY_NAMES

    policies = list(dict.fromkeys(p.strip() for p in policies if p.strip()))
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise EvalError(f"unknown polic{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; known: {', '.join(POLICY_NAMES)}")
    if match not in (None, "namm"):
        raise EvalError(f"--match only knows 'namm', got {match!r}")
    if match and "namm" not in policies:
        policies.insert(0, "namm")
    ordered = [p for p in ("namm", "full") if p in policies] + [p for p in policies if p not in UNBUDGETED]
    runs: list[PolicyRun] = []
    for policy in ordered:
        if policy in UNBUDGETED:
            runs.append(PolicyRun(policy))
            continue
        chosen = list(budgets) + ([Budget(match=match)] if match else [])
        if not chosen:
            raise EvalError(f"policy {policy!r} needs a budget (--budget F or --match namm)")
        runs.extend(PolicyRun(policy, b) for b in chosen)
    return runs


MATCH_SCOPES = ("task_length", "task", "overall")


def match_key(dataset: str, length: int | None = None) -> str:
    """Key of a (task, prompt length) group in :func:`matched_budgets`."""
    return f"{dataset}@{length}" if length else dataset


def matched_budgets(records: Iterable[Mapping[str, Any]], scope: str = "task_length") -> dict[str, dict[str, float]]:
    """The NAMM's mean kept fractions per task and prompt length (keys
    ``"needle@4096"``, ``scope="task_length"``: the NAMM keeps a smaller share of
    longer prompts, so each length is matched on its own), per dataset
    (``scope="task"``) or over all items (key ``"*"``, ``scope="overall"``).
    Items without a length (LongBench files) group by dataset.

    Each entry: ``kept_fraction`` (mean at the end of the prompt),
    ``step_kept_fraction`` (mean at the NAMM's last eviction step; the end-of-prompt
    value for items where it never stepped) and ``n``.
    """
    if scope not in MATCH_SCOPES:
        raise EvalError(f"match scope must be one of {', '.join(MATCH_SCOPES)}, got {scope!r}")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("policy") == "namm":
            key = {"task_length": match_key(r["dataset"], r.get("length")), "task": r["dataset"], "overall": "*"}[scope]
            groups.setdefault(key, []).append(r)
    out = {}
    for key, rows in groups.items():
        kept = [float(r["kept_fraction"]) for r in rows]
        step = [float(r["step_kept_fraction"] if r.get("step_kept_fraction") is not None else r["kept_fraction"]) for r in rows]
        out[key] = {"kept_fraction": sum(kept) / len(kept), "step_kept_fraction": sum(step) / len(step), "n": len(rows)}
    return out


def is_one_shot(policy: str, baseline_eviction: str = "prompt") -> bool:
    """Whether ``policy`` compresses once after the prompt under this schedule."""
    if policy in UNBUDGETED:
        return False
    return baseline_eviction == "prompt" or policy in ONE_SHOT


def effective_budget(
    run: PolicyRun,
    dataset: str,
    matched: Mapping[str, Mapping[str, float]] | None = None,
    baseline_eviction: str = "prompt",
    length: int | None = None,
) -> tuple[float | None, int | None]:
    """``(keep_fraction, max_kv_size)`` for ``run`` on an item of ``dataset``
    (and ``length``: a matched budget is looked up per task and length, then per
    task, then overall)."""
    if run.budget is None:
        return None, None
    if run.budget.match:
        table = matched or {}
        m = table.get(match_key(dataset, length)) or table.get(dataset) or table.get("*")
        if m is None:
            raise EvalError(f"no NAMM results on {dataset!r} to match {run.policy}'s budget to")
        one_shot = is_one_shot(run.policy, baseline_eviction)
        value = m["kept_fraction"] if one_shot else m["step_kept_fraction"]
        return min(1.0, max(value, 1e-6)), None
    return run.budget.keep_fraction, run.budget.max_kv_size


# --------------------------------------------------------------------------- predictions file


def item_hash(item: Mapping[str, Any]) -> str:
    """Short content hash: a resumed run only skips pairs for the very same item."""
    blob = json.dumps([item.get("context"), item.get("input"), item.get("answers")], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


def _schedule(policy: str, baseline_eviction: str) -> str:
    """What a pair's result depends on besides item, policy and budget."""
    if policy in UNBUDGETED:
        return "-" if policy == "namm" else "full"
    return "prompt" if is_one_shot(policy, baseline_eviction) else "online"


def pair_key(
    item_or_record: Mapping[str, Any], run: PolicyRun | None = None, baseline_eviction: str = "prompt"
) -> tuple[str, str, str, str, str]:
    """``(_id, item_hash, policy, budget label, schedule)`` of a record, or of an
    item and a run (records written before schedules existed were online)."""
    r = item_or_record
    if run is None:
        schedule = r.get("eviction") or _schedule(r["policy"], "online")
        return (str(r["_id"]), r["item_hash"], r["policy"], r["budget"], schedule)
    return (str(r["_id"]), item_hash(r), run.policy, run.budget_label, _schedule(run.policy, baseline_eviction))


def read_predictions(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a predictions file (none if it does not exist).

    A line that is not a complete JSON object (a run killed mid-write) is
    dropped; with ``repair`` the file is rewritten without it, so appending
    continues on a clean line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and {"_id", "item_hash", "policy", "budget", "score"} <= record.keys():
            records.append(record)
        else:
            bad += 1
    if bad and repair:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    return records


def pending_pairs(
    items: Sequence[Mapping[str, Any]],
    runs: Sequence[PolicyRun],
    records: Iterable[Mapping[str, Any]],
    baseline_eviction: str = "prompt",
) -> list[tuple[PolicyRun, Mapping[str, Any]]]:
    """The (run, item) pairs not yet in ``records``, run-major."""
    done = {pair_key(r) for r in records}
    return [(run, item) for run in runs for item in items if pair_key(item, run, baseline_eviction) not in done]


# --------------------------------------------------------------------------- one item


def cache_stats(cache: Sequence[Any]) -> dict[str, Any]:
    """Kept fraction (kept / seen tokens over all layers), the same at the last
    eviction step (None if no layer stepped) and the live KV bytes."""
    kept = seen = step_kept = step_seen = kv = 0
    for c in cache:
        if isinstance(c, EvictingKVCache):
            kept, seen, kv = kept + c.length, seen + c.offset, kv + c.kv_nbytes
            if c.steps:
                step_kept += c.length - c.n_new
                step_seen += c.last_step_offset
        else:
            size = c.size() if hasattr(c, "size") else c.offset
            kept, seen = kept + size, seen + c.offset
            kv += c.nbytes if hasattr(c, "empty") and not c.empty() else 0
    return {
        "kept_fraction": kept / seen if seen else 1.0,
        "step_kept_fraction": step_kept / step_seen if step_seen else None,
        "kv_cache_mb": kv / 1e6,
    }


def _decode(
    model: Any, tokenizer: Any, last_token: Sequence[int], cache: list[Any], max_tokens: int, prefill_step_size: int
) -> dict[str, Any]:
    """Greedy answer from the last prompt token with stock ``mlx_lm.stream_generate``."""
    import mlx_lm

    text, response = "", None
    start = time.perf_counter()
    for response in mlx_lm.stream_generate(
        model, tokenizer, list(last_token), max_tokens=max_tokens, prompt_cache=cache, prefill_step_size=prefill_step_size
    ):
        text += response.text
    return {
        "prediction": text,
        "generated_tokens": response.generation_tokens if response else 0,
        "decode_seconds": round(time.perf_counter() - start, 4),
        "decode_tps": round(response.generation_tps, 2) if response else 0.0,
        "finish_reason": response.finish_reason if response else None,
    }


def _timed_prefill(model: Any, cache: list[Any], prompt: Sequence[int], prefill_step_size: int) -> dict[str, Any]:
    """Prefill ``prompt[:-1]`` (aligned) and report its speed."""
    start = time.perf_counter()
    prefill(model, cache, prompt[:-1], prefill_step_size)
    seconds = time.perf_counter() - start
    return {
        "prompt_tokens": len(prompt),
        "prefill_seconds": round(seconds, 4),
        "prefill_tps": round((len(prompt) - 1) / seconds, 2) if seconds > 0 else 0.0,
    }


def generate_answer(
    model: Any,
    tokenizer: Any,
    prompt: Sequence[int],
    max_tokens: int,
    one_shot: bool = False,
    prefill_step_size: int = 512,
) -> dict[str, Any]:
    """Prefill ``prompt[:-1]`` (aligned), compress once if ``one_shot``, then
    generate greedily from the last prompt token with ``mlx_lm.stream_generate``."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.reset_peak_memory()
    timing = _timed_prefill(model, cache, prompt, prefill_step_size)
    if one_shot:
        evict_now(cache)
    stats = cache_stats(cache)
    decoded = _decode(model, tokenizer, prompt[-1:], cache, max_tokens, prefill_step_size)
    result = {**decoded, **stats, **timing, "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4)}
    del cache
    mx.clear_cache()
    return result


def _fork(cache: Sequence[Any], scorer: Any, keep_fraction: float | None, max_kv_size: int | None) -> list[Any]:
    """Every layer of a shared prefill, under ``scorer``; layers the NAMM cache
    does not manage (sliding windows) are copied through their state."""
    forks = []
    for c in cache:
        if isinstance(c, EvictingKVCache):
            forks.append(c.fork(scorer, max_kv_size=max_kv_size, keep_fraction=keep_fraction))
        else:
            forks.append(type(c).from_state(c.state, c.meta_state))
    return forks


def prepare_prompt(
    tokenizer: Any,
    item: Mapping[str, Any],
    context_limit: int | None,
    max_tokens: int | None,
    templates: Mapping[str, str] | None,
) -> tuple[list[int], bool, int]:
    """The item's prompt tokens, whether they were truncated, and the answer length."""
    limit = max_tokens or max_new_tokens(item.get("dataset", ""))
    budget = context_limit - limit if context_limit else None
    prompt, truncated = prompt_tokens(tokenizer, item, budget, templates)
    return prompt, truncated, limit


def _record(
    item: Mapping[str, Any],
    run: PolicyRun,
    out: dict[str, Any],
    keep_fraction: float | None,
    max_kv_size: int | None,
    truncated: bool,
    eviction: str,
) -> dict[str, Any]:
    dataset = item.get("dataset", "")
    answers = item["answers"] if isinstance(item["answers"], list) else [item["answers"]]
    score = score_prediction(dataset, out["prediction"], answers, item.get("all_classes"))
    return {
        "_id": str(item["_id"]),
        "item_hash": item_hash(item),
        "dataset": dataset,
        "length": item.get("length"),
        "depth": item.get("depth"),
        "policy": run.policy,
        "budget": run.budget_label,
        "eviction": eviction,
        "keep_fraction_cap": keep_fraction,
        "max_kv_size": max_kv_size,
        "prediction": out.pop("prediction"),
        "answers": answers,
        "score": score,
        "metric": metric_name(dataset),
        "truncated": truncated,
        **out,
    }


def evaluate_item(
    model: Any,
    tokenizer: Any,
    item: Mapping[str, Any],
    run: PolicyRun,
    *,
    keep_fraction: float | None = None,
    max_kv_size: int | None = None,
    context_limit: int | None = None,
    max_tokens: int | None = None,
    templates: Mapping[str, str] | None = None,
    prefill_step_size: int = 512,
) -> dict[str, Any]:
    """One prediction record with the policy's own prefill (the model must
    already be attached for ``run``; baselines other than SnapKV evict online)."""
    prompt, truncated, limit = prepare_prompt(tokenizer, item, context_limit, max_tokens, templates)
    out = generate_answer(model, tokenizer, prompt, limit, run.policy in ONE_SHOT, prefill_step_size)
    return _record(item, run, out, keep_fraction, max_kv_size, truncated, _schedule(run.policy, "online"))


def shared_prefill_scorer() -> H2OScorer:
    """The scorer of the shared prefill: keeps everything, sums received attention
    every 512 tokens (H2O's statistic) and retains the prompt's last queries."""
    return H2OScorer(retain_queries=SHARED_QUERY_ROWS)


def evaluate_item_shared(
    model: Any,
    tokenizer: Any,
    item: Mapping[str, Any],
    runs: Sequence[tuple[PolicyRun, Any, float | None, int | None]],
    *,
    context_limit: int | None = None,
    max_tokens: int | None = None,
    templates: Mapping[str, str] | None = None,
    prefill_step_size: int = 512,
) -> Iterable[dict[str, Any]]:
    """Records for ``runs`` (``(run, one-shot scorer, keep_fraction, max_kv_size)``)
    from one prefill of the item: yields each as soon as it is done.

    The model must be attached with :func:`shared_prefill_scorer` and no budget.
    Each run forks the prefilled caches, compresses them once (``evict_now``;
    the full cache is left as is) and decodes.
    """
    from mlx_lm.models.cache import make_prompt_cache

    prompt, truncated, limit = prepare_prompt(tokenizer, item, context_limit, max_tokens, templates)
    cache = make_prompt_cache(model)
    mx.reset_peak_memory()
    timing = _timed_prefill(model, cache, prompt, prefill_step_size)
    prefill_peak = mx.get_peak_memory()
    for run, scorer, keep_fraction, max_kv_size in runs:
        forks = _fork(cache, scorer, keep_fraction, max_kv_size)
        mx.reset_peak_memory()
        start = time.perf_counter()
        if run.policy != "full":
            evict_now(forks, force=True)
        compress_seconds = time.perf_counter() - start
        stats = cache_stats(forks)
        decoded = _decode(model, tokenizer, prompt[-1:], forks, limit, prefill_step_size)
        peak = max(prefill_peak, mx.get_peak_memory())
        out = {
            **decoded,
            **stats,
            **timing,
            "prefill_seconds": round(timing["prefill_seconds"] + compress_seconds, 4),
            "compress_seconds": round(compress_seconds, 4),
            "peak_memory_gb": round(peak / 1e9, 4),
        }
        del forks
        yield _record(item, run, out, keep_fraction, max_kv_size, truncated, _schedule(run.policy, "prompt"))
    del cache
    mx.clear_cache()


# --------------------------------------------------------------------------- summaries


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    prefill_s = sum(r["prefill_seconds"] for r in rows)
    decode_s = sum(r["generated_tokens"] / r["decode_tps"] for r in rows if r.get("decode_tps"))
    return {
        "n": len(rows),
        "score": round(100 * _mean([r["score"] for r in rows]), 2),
        "kept_fraction": round(_mean([r["kept_fraction"] for r in rows]), 4),
        "peak_memory_gb": round(max(r["peak_memory_gb"] for r in rows), 3),
        "kv_cache_mb": round(_mean([r["kv_cache_mb"] for r in rows]), 2),
        "prefill_tps": round(sum(r["prompt_tokens"] - 1 for r in rows) / prefill_s, 1) if prefill_s else 0.0,
        "decode_tps": round(sum(r["generated_tokens"] for r in rows) / decode_s, 1) if decode_s else 0.0,
    }


def summarize(records: Sequence[Mapping[str, Any]], runs: Sequence[PolicyRun] | None = None) -> dict[str, Any]:
    """Per task × run, per task × length × run and overall (mean over tasks) rows.

    Scores are 100 × the mean item score (LongBench's scale)."""
    order = {r.label: i for i, r in enumerate(runs or [])}

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
    for t in by_task:
        per_run.setdefault(t["run"], []).append(t)
    for label in sorted(per_run, key=lambda l: (order.get(l, len(order)), l)):
        rows = per_run[label]
        overall.append(
            {
                "run": label,
                "policy": rows[0]["policy"],
                "budget": rows[0]["budget"],
                "tasks": len(rows),
                "n": sum(t["n"] for t in rows),
                "score": round(_mean([t["score"] for t in rows]), 2),
                "kept_fraction": round(_mean([t["kept_fraction"] for t in rows]), 4),
                "peak_memory_gb": max(t["peak_memory_gb"] for t in rows),
                "prefill_tps": round(_mean([t["prefill_tps"] for t in rows]), 1),
                "decode_tps": round(_mean([t["decode_tps"] for t in rows]), 1),
            }
        )
    metrics = {r["dataset"]: r.get("metric") for r in records}
    return {"by_task": by_task, "by_length": by_length, "overall": overall, "metrics": metrics}


def format_table(summary: Mapping[str, Any]) -> str:
    """task × run table: score, mean kept fraction, peak memory, prefill/decode tok/s."""
    head = ("task", "policy", "budget", "n", "score", "kept", "peak GB", "prefill tok/s", "decode tok/s")
    rows = [
        (t["task"], t["policy"], t["budget"], str(t["n"]), f"{t['score']:.2f}", f"{t['kept_fraction']:.3f}",
         f"{t['peak_memory_gb']:.2f}", f"{t['prefill_tps']:.1f}", f"{t['decode_tps']:.1f}")
        for t in summary["by_task"]
    ]
    if len({t["task"] for t in summary["by_task"]}) > 1:
        rows += [
            ("(mean)", o["policy"], o["budget"], str(o["n"]), f"{o['score']:.2f}", f"{o['kept_fraction']:.3f}",
             f"{o['peak_memory_gb']:.2f}", f"{o['prefill_tps']:.1f}", f"{o['decode_tps']:.1f}")
            for o in summary["overall"]
        ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


# --------------------------------------------------------------------------- progress


class Progress:
    """One self-rewriting stderr line with a bar, counts, the current pair and an ETA
    (estimated from prompt tokens done so far)."""

    def __init__(self, weights: Sequence[float], stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = sum(weights) or 1.0
        self.count = len(weights)
        self.done = 0.0
        self.finished = 0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.count > 0

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(max(seconds, 0))
        h, rest = divmod(seconds, 3600)
        return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"

    def show(self, what: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        filled = int(24 * self.done / self.total)
        eta_text = self._clock(eta) if math.isfinite(eta) else "?"
        line = (
            f"\reval [{'#' * filled}{'-' * (24 - filled)}] {self.finished}/{self.count}  {what[:48]:<48}  "
            f"elapsed {self._clock(elapsed)}  eta {eta_text}"
        )
        print(line, end="", file=self.stream, flush=True)

    def advance(self, weight: float, what: str) -> None:
        self.done += weight
        self.finished += 1
        self.show(what)

    def close(self) -> None:
        if self.enabled:
            print(file=self.stream, flush=True)


# --------------------------------------------------------------------------- the loop


def namm_fingerprint(scorer: Any) -> str:
    """Short hash of a NAMM scorer's weights and normalisation (what its results depend on)."""
    digest = hashlib.sha256()
    for name, array in sorted(scorer.arrays().items()):
        digest.update(name.encode())
        digest.update(np.asarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()[:12]


def _make_scorer(policy: str, namm_scorer: Any, seed: int, one_shot: bool = False) -> Any:
    from ..policies import make_scorer

    if policy == "namm":
        return make_scorer("namm", namm=namm_scorer)
    params: dict[str, Any] = {"seed": seed} if policy == "random" else {}
    if one_shot:
        params["interval"] = None
    return make_scorer(policy, **params)


def _item_weight(item: Mapping[str, Any]) -> float:
    return float(item.get("length") or 0) or len(item.get("context", "")) / 4 + 1


def run_eval(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    runs: Sequence[PolicyRun],
    out_dir: str | Path,
    *,
    namm: Any = None,
    seed: int = 0,
    context_limit: int | None = None,
    max_tokens: int | None = None,
    templates: Mapping[str, str] | None = None,
    prefill_step_size: int = 512,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stream: TextIO | None = None,
    baseline_eviction: str = "prompt",
) -> dict[str, Any]:
    """Evaluate ``items`` under every run, resuming from ``out_dir/predictions.jsonl``.

    namm: a NAMM, NAMM folder or scorer (needed when a run uses the ``namm``
    policy). baseline_eviction: ``"prompt"`` (baselines compress once after the
    prompt, sharing one prefill per item with the full cache) or ``"online"``
    (each baseline evicts every 512 tokens in its own prefill). Returns the
    results dict also written to ``out_dir/results.json``;
    ``out_dir/score_vs_kept.png`` is drawn from it.
    """
    from ..integration import as_scorer, attach, detach

    if baseline_eviction not in BASELINE_EVICTION:
        raise EvalError(f"baseline eviction must be one of {', '.join(BASELINE_EVICTION)}, got {baseline_eviction!r}")

    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    ids = [str(i["_id"]) for i in items]
    if len(set(ids)) != len(ids):
        raise EvalError("item ids (_id) are not unique")
    namm_scorer = as_scorer(namm) if any(r.policy == "namm" for r in runs) else None
    fingerprint = namm_fingerprint(namm_scorer) if namm_scorer is not None else None
    records = read_predictions(pred_path, repair=True)
    stale = {r.get("namm_sha") for r in records if r.get("policy") == "namm"} - {None, fingerprint}
    if fingerprint and stale:
        raise EvalError(
            f"{pred_path} holds NAMM results from other weights ({', '.join(sorted(stale))}, now {fingerprint}): "
            "resuming would mix them; use a new --out, or delete its namm and match:namm lines"
        )
    todo = pending_pairs(items, runs, records, baseline_eviction)
    if records and len(todo) < len(items) * len(runs):
        log(f"resuming: {len(items) * len(runs) - len(todo)} of {len(items) * len(runs)} item x policy pairs already in {pred_path}")
    shared = baseline_eviction == "prompt"
    per_item = {id(i): sum(1 for _, j in todo if j is i) for i in items}
    weights = [_item_weight(i) / (per_item[id(i)] if shared and r.policy != "namm" else 1) for r, i in todo]
    bar = Progress(weights, stream=stream, enabled=progress)
    plan_keys = {pair_key(i, r, baseline_eviction) for r in runs for i in items}
    options = dict(context_limit=context_limit, max_tokens=max_tokens, templates=templates, prefill_step_size=prefill_step_size)
    matched_cache: dict[str, dict[str, float]] = {}

    def matched() -> dict[str, dict[str, float]]:
        if not matched_cache:  # first asked once the NAMM's pairs are all done
            current = [r for r in read_predictions(pred_path) if pair_key(r) in plan_keys]
            matched_cache.update(matched_budgets(current))
        return matched_cache

    def budget_of(run: PolicyRun, item: Mapping[str, Any]) -> tuple[float | None, int | None]:
        needs_match = run.budget is not None and run.budget.match
        table = matched() if needs_match else None
        return effective_budget(run, item.get("dataset", ""), table, baseline_eviction, item.get("length"))

    try:
        with open(pred_path, "a", encoding="utf-8") as sink:

            def emit(record: dict[str, Any], item: Mapping[str, Any], run: PolicyRun) -> None:
                if fingerprint and (run.policy == "namm" or (run.budget is not None and run.budget.match)):
                    record["namm_sha"] = fingerprint
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                bar.advance(_item_weight(item) / (per_item[id(item)] if shared and run.policy != "namm" else 1), f"{item['_id']} {run.label}")

            for run in runs:
                if shared and run.policy != "namm":
                    continue
                groups: dict[tuple, list] = {}
                for r, item in todo:
                    if r == run:
                        groups.setdefault(budget_of(run, item), []).append(item)
                for (keep_fraction, max_kv_size), group in groups.items():
                    attach(model, _make_scorer(run.policy, namm_scorer, seed), max_kv_size=max_kv_size, keep_fraction=keep_fraction)
                    try:
                        for item in group:
                            bar.show(f"{item['_id']} {run.label}")
                            record = evaluate_item(
                                model, tokenizer, item, run, keep_fraction=keep_fraction, max_kv_size=max_kv_size, **options
                            )
                            emit(record, item, run)
                    finally:
                        detach(model)
            if shared and any(r.policy != "namm" for r, _ in todo):
                attach(model, shared_prefill_scorer())
                try:
                    for item in items:
                        item_runs = [r for r, i in todo if i is item and r.policy != "namm"]
                        if not item_runs:
                            continue
                        bar.show(f"{item['_id']} prefill")
                        planned = [
                            (r, _make_scorer(r.policy, None, seed, one_shot=r.policy != "full"), *budget_of(r, item))
                            for r in item_runs
                        ]
                        for run, record in zip(item_runs, evaluate_item_shared(model, tokenizer, item, planned, **options)):
                            emit(record, item, run)
                finally:
                    detach(model)
    finally:
        bar.close()
    return write_results(out, runs, items, config=config, baseline_eviction=baseline_eviction)


def write_results(
    out_dir: str | Path,
    runs: Sequence[PolicyRun],
    items: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    baseline_eviction: str = "prompt",
) -> dict[str, Any]:
    """Recompute every summary from ``predictions.jsonl`` (only the pairs of this
    plan), write ``results.json`` and the score-vs-kept plot."""
    from .plot import POLICY_COLORS, plot_score_vs_kept

    out = Path(out_dir)
    plan_keys = {pair_key(i, r, baseline_eviction) for r in runs for i in items}
    records = [r for r in read_predictions(out / PREDICTIONS) if pair_key(r) in plan_keys]
    summary = summarize(records, runs)
    results = {
        "config": dict(config or {}),
        "complete": len(records) == len(plan_keys),
        "pairs": {"done": len(records), "planned": len(plan_keys)},
        "scale": "score = 100 x mean item score (LongBench); kept = mean kept fraction at the end of the prompt",
        **summary,
        "matched_budgets": matched_budgets(records) if any(r.budget and r.budget.match for r in runs) else None,
        "legend": {p: POLICY_COLORS.get(p) for p in dict.fromkeys(r.policy for r in runs)},
        "plot": PLOT,
    }
    plotted = plot_score_vs_kept(summary["overall"], out / PLOT)
    if not plotted:
        results["plot"] = None
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / RESULTS)
    return results
