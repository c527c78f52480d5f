"""Run evaluation items through every eviction policy and score the answers.

One loop serves the synthetic tasks and LongBench JSONL files. Two protocols
(``protocol``):

* ``"agnostic"`` (default; what a user of ``namm chat`` lives with): the
  document is read and compressed before the question is seen
  (:mod:`namm_mlx.eval.query_agnostic`). Every policy evicts online while the
  document is read (every 512 tokens, SnapKV with its observation window at
  each step), runs one more step at the document's end, and only then gets the
  question and generates greedily. Budgets are fixed: a fraction ``f`` means
  ``ceil(f * document tokens)`` tokens per layer (the cache's ``max_kv_size``,
  so at most that many are kept after every step), an integer means that many
  tokens; both apply identically to the NAMM (ranked by its score, its
  threshold ignored) and every baseline. With ``baseline_eviction="prompt"``
  the baselines compress once, at the document's end, instead. Every (item,
  run) also gets its future-attention recall (:mod:`namm_mlx.eval.recall`),
  from one full-cache pass per item over document, question and teacher-forced
  reference answer, shared by every policy. ``recall_only`` skips the answers
  and replays that recording through each policy's caches instead of running
  the model per policy (:func:`replay_document`: exact for the full cache and
  one-shot policies, kvpress's one-shot approximation for online ones), so
  recall can cover many more items.
* ``"aware"`` (``--query-aware``): today's one-shot question-aware mode. The
  whole prompt, question included, is prefilled before the answer. The NAMM
  runs online (aligned 512-token chunks, a step every 512 tokens); baselines
  have two schedules (``baseline_eviction``): ``"prompt"`` (each baseline
  compresses once right after the prompt, with the whole prompt's attention in
  view, as kvpress applies its presses; one full-cache prefill per item is
  forked (:meth:`EvictingKVCache.fork`) for the full cache and every baseline
  and budget, the prefill running an unbudgeted H2O scorer that sums received
  attention and retains the last queries) or ``"online"`` (each baseline runs
  separately at the NAMM's 512-token cadence; SnapKV stays one-shot). A
  fraction budget here is the cache's ``keep_fraction``: after each step a
  layer keeps at most that share of the tokens seen so far.

Every finished (item, run) pair is appended to ``predictions.jsonl`` at once, so
an interrupted run resumes where it stopped: pairs already in the file are
skipped (matched on item id, a hash of the item's content, the policy, the
budget label, the schedule and the protocol, so results of the two protocols
never mix) and every summary is recomputed from the file, with a 95% bootstrap
interval per row (:mod:`namm_mlx.eval.bootstrap`).

``full`` takes no budget. Under ``"aware"`` neither does ``namm`` (it decides
how much to keep); under ``"agnostic"`` the NAMM runs at every budget, plus its
own threshold-0 run when ``--match namm`` asks for it. ``--match namm`` runs
each baseline, per task and prompt length, at the NAMM's mean kept fraction:
under ``"agnostic"`` the fraction of the document kept at its end; under
``"aware"`` measured at the NAMM's last eviction step for the periodic
baselines (so their budget caps the same quantity), and at the end of the
prompt for one-shot baselines (which have no unevicted tail). A second NAMM
(``namm2``, e.g. a distilled one) can be evaluated beside the first.
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
from .bootstrap import bootstrap_interval
from .metrics import max_new_tokens, metric_name, score_prediction
from .prompts import encode, prompt_tokens
from .query_agnostic import (
    SplitPrompt,
    document_kept_fraction,
    kept_digest,
    read_document,
    replay_document,
    split_prompt,
)

#: Policies scored by a NAMM: the shipped (or ``--namm``) one and a second one.
NAMM_POLICIES = ("namm", "namm2")
#: Policies that take no budget under the question-aware protocol.
UNBUDGETED = ("full", *NAMM_POLICIES)
#: Policies compressed once after the prompt under the ``"online"`` schedule
#: of the question-aware protocol.
ONE_SHOT = ("snapkv",)
#: Baseline schedules: at the 512 cadence, or compress once (after the document
#: or, question-aware, after the prompt).
BASELINE_EVICTION = ("online", "prompt")
#: Evaluation protocols: document compressed before the question, or question in context.
PROTOCOLS = ("agnostic", "aware")
#: Eviction cadence of every online policy (the NAMM's ``update_interval``).
INTERVAL = 512
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


def plan_runs(
    policies: Sequence[str], budgets: Sequence[Budget], match: str | None = None, budget_namm: bool = False
) -> list[PolicyRun]:
    """Every (policy, budget) run, the NAMMs' own runs first (``match`` needs them).

    ``match="namm"`` adds a matched budget for every baseline (and the NAMM run
    if it was not asked for). Baselines with neither budgets nor ``match`` fail.
    budget_namm: the NAMMs run at every budget too (ranked, the query-agnostic
    protocol), and at their own threshold only under ``match`` or without budgets.
    """
    from ..policies import POLICY_NAMES

    known = (*POLICY_NAMES, *NAMM_POLICIES[1:])
    policies = list(dict.fromkeys(p.strip() for p in policies if p.strip()))
    unknown = [p for p in policies if p not in known]
    if unknown:
        raise EvalError(f"unknown polic{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; known: {', '.join(known)}")
    if match not in (None, "namm"):
        raise EvalError(f"--match only knows 'namm', got {match!r}")
    if match and "namm" not in policies:
        policies.insert(0, "namm")
    namms = [p for p in NAMM_POLICIES if p in policies]
    runs: list[PolicyRun] = []
    for policy in namms:
        if not budget_namm or not budgets or (match and policy == "namm"):
            runs.append(PolicyRun(policy))
    if "full" in policies:
        runs.append(PolicyRun("full"))
    budgeted = (namms if budget_namm else []) + [p for p in policies if p not in UNBUDGETED]
    for policy in budgeted:
        chosen = list(budgets) + ([Budget(match=match)] if match and policy not in NAMM_POLICIES else [])
        if not chosen:
            if policy in NAMM_POLICIES:
                continue
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

    Each entry: ``kept_fraction`` (mean at the end of the prompt; under the
    query-agnostic protocol, at the end of the document),
    ``step_kept_fraction`` (mean at the NAMM's last eviction step; the end-of-prompt
    value for items where it never stepped) and ``n``.
    """
    if scope not in MATCH_SCOPES:
        raise EvalError(f"match scope must be one of {', '.join(MATCH_SCOPES)}, got {scope!r}")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("policy") == "namm" and r.get("budget", "-") == "-":
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


def document_budget(
    run: PolicyRun,
    dataset: str,
    document_tokens: int,
    matched: Mapping[str, Mapping[str, float]] | None = None,
    length: int | None = None,
) -> int | None:
    """Tokens per layer (``max_kv_size``) ``run`` may keep under the query-agnostic
    protocol, for an item whose document part has ``document_tokens`` tokens.

    A fraction ``f`` (or the NAMM's matched kept fraction of the document) is
    ``ceil(f * document_tokens)``: a fixed budget that holds after every step,
    unlike the question-aware protocol's ``keep_fraction``, which caps the share
    of the tokens seen so far. None: no budget (full, the NAMM's own threshold).
    """
    if run.budget is None:
        return None
    if run.budget.max_kv_size is not None:
        return run.budget.max_kv_size
    if run.budget.match:
        table = matched or {}
        m = table.get(match_key(dataset, length)) or table.get(dataset) or table.get("*")
        if m is None:
            raise EvalError(f"no NAMM results on {dataset!r} to match {run.policy}'s budget to")
        fraction = min(1.0, max(m["kept_fraction"], 1e-6))
    else:
        fraction = run.budget.keep_fraction
    return max(1, math.ceil(fraction * document_tokens))


# --------------------------------------------------------------------------- predictions file


def item_hash(item: Mapping[str, Any]) -> str:
    """Short content hash: a resumed run only skips pairs for the very same item."""
    blob = json.dumps([item.get("context"), item.get("input"), item.get("answers")], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


def _schedule(policy: str, baseline_eviction: str, protocol: str = "agnostic", recall_only: bool = False) -> str:
    """What a pair's result depends on besides item, policy, budget and protocol.

    Recall-only runs replay a recording (:func:`replay_document`): exact for the
    full cache and one-shot policies (same key as their scored runs), an
    approximation for online ones (their own schedule, ``"replay"``)."""
    if policy == "full":
        return "full"
    if protocol == "aware":
        return "-" if policy in NAMM_POLICIES else ("prompt" if is_one_shot(policy, baseline_eviction) else "online")
    schedule = "online" if policy in NAMM_POLICIES else baseline_eviction
    return "replay" if recall_only and schedule == "online" else schedule


def pair_key(
    item_or_record: Mapping[str, Any],
    run: PolicyRun | None = None,
    baseline_eviction: str = "online",
    protocol: str = "agnostic",
    recall_only: bool = False,
) -> tuple[str, str, str, str, str, str]:
    """``(_id, item_hash, policy, budget label, schedule, protocol)`` of a record,
    or of an item and a run. Records written before schedules existed were
    online; records without a protocol are question-aware (the only one then)."""
    r = item_or_record
    if run is None:
        schedule = r.get("eviction") or _schedule(r["policy"], "online", "aware")
        return (str(r["_id"]), r["item_hash"], r["policy"], r["budget"], schedule, r.get("protocol") or "aware")
    schedule = _schedule(run.policy, baseline_eviction, protocol, recall_only)
    return (str(r["_id"]), item_hash(r), run.policy, run.budget_label, schedule, protocol)


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
    baseline_eviction: str = "online",
    protocol: str = "agnostic",
    recall_only: bool = False,
) -> list[tuple[PolicyRun, Mapping[str, Any]]]:
    """The (run, item) pairs not yet in ``records``, run-major. A recall-only
    record (no score) completes a pair only for a recall-only run."""
    done = {pair_key(r) for r in records if recall_only or r.get("score") is not None}
    return [
        (run, item)
        for run in runs
        for item in items
        if pair_key(item, run, baseline_eviction, protocol, recall_only) not in done
    ]


def latest_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per pair: the last one written, unless only an earlier one has a
    score (a recall-only record never hides a scored one)."""
    chosen: dict[tuple, Mapping[str, Any]] = {}
    for r in records:
        key = pair_key(r)
        if key in chosen and r.get("score") is None and chosen[key].get("score") is not None:
            continue
        chosen[key] = r
    return list(chosen.values())


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
    protocol: str = "aware",
) -> dict[str, Any]:
    """The predictions-file line of one (item, run); no prediction (recall only): no score."""
    dataset = item.get("dataset", "")
    answers = item["answers"] if isinstance(item["answers"], list) else [item["answers"]]
    prediction = out["prediction"]
    score = None if prediction is None else score_prediction(dataset, prediction, answers, item.get("all_classes"))
    return {
        "_id": str(item["_id"]),
        "item_hash": item_hash(item),
        "dataset": dataset,
        "length": item.get("length"),
        "depth": item.get("depth"),
        "policy": run.policy,
        "budget": run.budget_label,
        "protocol": protocol,
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
    return _record(item, run, out, keep_fraction, max_kv_size, truncated, _schedule(run.policy, "online", "aware"))


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
        yield _record(item, run, out, keep_fraction, max_kv_size, truncated, _schedule(run.policy, "prompt", "aware"))
    del cache
    mx.clear_cache()


def _recall_fields(future: Any, trace: Sequence[Any] | None) -> dict[str, Any]:
    """Future-attention recall of a kept-set trace: mean over steps, at the
    document's end, from the question and answer only, per layer and per step."""
    from .recall import future_attention_recall

    if future is None or not trace:
        return {}
    result = future_attention_recall(future, trace)
    rounded = lambda values: [round(float(v), 5) for v in values]  # noqa: E731
    question = result.question_final
    return {
        "recall": round(result.mean, 6),
        "recall_final": round(result.final, 6),
        "recall_question": None if math.isnan(question) else round(question, 6),
        "recall_per_layer": rounded(result.per_layer),
        "recall_per_step": rounded(result.per_step),
        "recall_offsets": list(result.offsets),
    }


def record_future(
    model: Any, tokenizer: Any, item: Mapping[str, Any], split: SplitPrompt, step: int = INTERVAL, keep: bool = False
) -> tuple[Any, list[Any] | None]:
    """The full-cache future attention of an item (document, question, then the
    teacher-forced reference answer), shared by every policy's recall, and with
    ``keep`` the recorded caches themselves (for :func:`replay_document`). The
    model must not be attached (the recording attaches and detaches its own
    scorer). ``(None, None)`` for an empty document."""
    from ..recording import record_full_cache
    from .likelihood import reference_answer
    from .recall import future_attention_from_caches

    if not split.document:
        return None, None
    try:
        answer = encode(tokenizer, reference_answer(item))
    except ValueError:
        answer = []
    caches = record_full_cache(model, split.tokens + answer, step, split=len(split.document))
    future = future_attention_from_caches(caches, len(split.document), step)
    return future, (caches if keep else None)


def evaluate_item_replayed(
    item: Mapping[str, Any],
    run: PolicyRun,
    split: SplitPrompt,
    recorded: Sequence[Any],
    future: Any,
    scorer: Any,
    *,
    max_kv_size: int | None = None,
    eviction: str = "replay",
) -> dict[str, Any]:
    """A recall-only record from a full-cache recording: the policy's kept sets
    come from :func:`replay_document` (no model forward), so recall costs the
    policy's steps only. No answer, so no score."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    trace, caches = replay_document(recorded, scorer, len(split.document), max_kv_size, INTERVAL)
    seconds = time.perf_counter() - start
    out = {
        "document_tokens": len(split.document),
        "question_tokens": len(split.question),
        "prompt_tokens": len(split.document) + len(split.question),
        "kept_fraction": document_kept_fraction(caches),
        "kept_digest": kept_digest(caches),
        "document_seconds": round(seconds, 4),
        **_recall_fields(future, trace),
        "prediction": None,
        "generated_tokens": 0,
        "decode_tps": 0.0,
        "kv_cache_mb": cache_stats(caches)["kv_cache_mb"],
        "prefill_seconds": round(seconds, 4),
        "prefill_tps": round(len(split.document) / seconds, 2) if seconds > 0 else 0.0,
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
    }
    del caches
    return _record(item, run, out, None, max_kv_size, split.truncated, eviction, "agnostic")


def evaluate_item_agnostic(
    model: Any,
    tokenizer: Any,
    item: Mapping[str, Any],
    run: PolicyRun,
    split: SplitPrompt,
    limit: int,
    *,
    max_kv_size: int | None = None,
    eviction: str = "online",
    future: Any = None,
    prefill_step_size: int = INTERVAL,
) -> dict[str, Any]:
    """One query-agnostic prediction record (the model must already be attached
    for ``run`` with ``max_kv_size``).

    The document part is read and compressed first (:func:`read_document`),
    the kept set and its recall against ``future`` are recorded, then the
    question part is fed and the answer generated greedily. ``kept_fraction``
    is the share of the document kept at its end; ``prompt_kept_fraction`` the
    share of the prompt kept before the answer.
    """
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    mx.reset_peak_memory()
    start = time.perf_counter()
    trace = read_document(model, caches, split.document, prefill_step_size, trace=future is not None)
    document_seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "document_tokens": len(split.document),
        "question_tokens": len(split.question),
        "prompt_tokens": len(split.document) + len(split.question),
        "kept_fraction": document_kept_fraction(caches),
        "kept_digest": kept_digest(caches),
        "document_seconds": round(document_seconds, 4),
        **_recall_fields(future, trace),
    }
    start = time.perf_counter()
    prefill(model, caches, split.question[:-1], prefill_step_size)
    seconds = document_seconds + time.perf_counter() - start
    stats = cache_stats(caches)
    out.update(
        prompt_kept_fraction=stats["kept_fraction"],
        step_kept_fraction=stats["step_kept_fraction"],
        kv_cache_mb=stats["kv_cache_mb"],
        prefill_seconds=round(seconds, 4),
        prefill_tps=round((out["prompt_tokens"] - 1) / seconds, 2) if seconds > 0 else 0.0,
        **_decode(model, tokenizer, split.question[-1:], caches, limit, prefill_step_size),
    )
    out["peak_memory_gb"] = round(mx.get_peak_memory() / 1e9, 4)
    del caches
    mx.clear_cache()
    return _record(item, run, out, None, max_kv_size, split.truncated, eviction, "agnostic")


# --------------------------------------------------------------------------- summaries


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


def _make_scorer(
    policy: str, namm_scorer: Any, seed: int, one_shot: bool = False, ranked: bool = False, interval: int | None = None
) -> Any:
    """The scorer of one run: a NAMM (``ranked``: top tokens up to the cache's
    budget, its threshold ignored) or a baseline (one-shot, or every ``interval``
    tokens; without either its own default cadence)."""
    from ..policies import make_scorer

    if policy in NAMM_POLICIES:
        return make_scorer("namm", namm=namm_scorer, ranked=True) if ranked else make_scorer("namm", namm=namm_scorer)
    params: dict[str, Any] = {"seed": seed} if policy == "random" else {}
    if one_shot:
        params["interval"] = None
    elif interval is not None:
        params["interval"] = interval
    return make_scorer(policy, **params)


def _item_weight(item: Mapping[str, Any]) -> float:
    return float(item.get("length") or 0) or len(item.get("context", "")) / 4 + 1


def _check_namm_results(records: Sequence[Mapping[str, Any]], fingerprints: Mapping[str, str], pred_path: Path) -> None:
    """Refuse to resume NAMM results made with other weights than the given ones."""
    for policy, fingerprint in fingerprints.items():
        stale = {r.get("namm_sha") for r in records if r.get("policy") == policy} - {None, fingerprint}
        if stale:
            raise EvalError(
                f"{pred_path} holds {policy} results from other weights ({', '.join(sorted(stale))}, now {fingerprint}): "
                f"resuming would mix them; use a new --out, or delete its {policy} and match:namm lines"
            )


def run_eval(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    runs: Sequence[PolicyRun],
    out_dir: str | Path,
    *,
    namm: Any = None,
    namm2: Any = None,
    seed: int = 0,
    context_limit: int | None = None,
    max_tokens: int | None = None,
    templates: Mapping[str, str] | None = None,
    prefill_step_size: int = 512,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stream: TextIO | None = None,
    baseline_eviction: str = "online",
    protocol: str = "agnostic",
    recall: bool = True,
    recall_only: bool = False,
) -> dict[str, Any]:
    """Evaluate ``items`` under every run, resuming from ``out_dir/predictions.jsonl``.

    namm / namm2: a NAMM, NAMM folder or scorer (needed when a run uses the
    ``namm`` / ``namm2`` policy; ``namm`` defaults to the shipped one).
    protocol: ``"agnostic"`` (document compressed before the question) or
    ``"aware"`` (question in the compressed prompt); see the module docstring.
    baseline_eviction: ``"online"`` (every 512 tokens) or ``"prompt"`` (once,
    after the document or, question-aware, after the prompt, sharing one
    prefill per item with the full cache). recall: measure each pair's
    future-attention recall (query-agnostic only); recall_only: only recall,
    from a replay of each item's full-cache recording (no answers). Returns
    the results dict also written to ``out_dir/results.json``;
    ``out_dir/score_vs_kept.png`` is drawn from it.
    """
    from ..integration import as_scorer, attach, detach

    if baseline_eviction not in BASELINE_EVICTION:
        raise EvalError(f"baseline eviction must be one of {', '.join(BASELINE_EVICTION)}, got {baseline_eviction!r}")
    if protocol not in PROTOCOLS:
        raise EvalError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if recall_only and (protocol != "agnostic" or not recall):
        raise EvalError("recall-only evaluation needs the query-agnostic protocol with recall")
    recall = recall and protocol == "agnostic"

    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    ids = [str(i["_id"]) for i in items]
    if len(set(ids)) != len(ids):
        raise EvalError("item ids (_id) are not unique")
    namm_scorers: dict[str, Any] = {}
    for policy, source in (("namm", namm), ("namm2", namm2)):
        if any(r.policy == policy for r in runs):
            if policy == "namm2" and source is None:
                raise EvalError("the namm2 policy needs a second NAMM (--namm2 DIR)")
            namm_scorers[policy] = as_scorer(source)
    fingerprints = {policy: namm_fingerprint(scorer) for policy, scorer in namm_scorers.items()}
    records = read_predictions(pred_path, repair=True)
    _check_namm_results(records, fingerprints, pred_path)
    other = sum(1 for r in records if (r.get("protocol") or "aware") != protocol)
    if other:
        name = {"agnostic": "query-agnostic", "aware": "question-aware"}[next(p for p in PROTOCOLS if p != protocol)]
        log(f"note: {other} records in {pred_path} were made under the {name} protocol; they stay apart from this table")
    todo = pending_pairs(items, runs, records, baseline_eviction, protocol, recall_only)
    if records and len(todo) < len(items) * len(runs):
        log(f"resuming: {len(items) * len(runs) - len(todo)} of {len(items) * len(runs)} item x policy pairs already in {pred_path}")
    shared = baseline_eviction == "prompt" and protocol == "aware"
    per_item = {id(i): sum(1 for _, j in todo if j is i) for i in items}

    def weight(run: PolicyRun, item: Mapping[str, Any]) -> float:
        return _item_weight(item) / (per_item[id(item)] if shared and run.policy not in NAMM_POLICIES else 1)

    bar = Progress([weight(r, i) for r, i in todo], stream=stream, enabled=progress)
    plan_keys = {pair_key(i, r, baseline_eviction, protocol, recall_only) for r in runs for i in items}
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
                if run.policy in fingerprints:
                    record["namm_sha"] = fingerprints[run.policy]
                elif run.budget is not None and run.budget.match and "namm" in fingerprints:
                    record["namm_sha"] = fingerprints["namm"]
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                bar.advance(weight(run, item), f"{item['_id']} {run.label}")

            if protocol == "agnostic":
                _agnostic_loop(
                    model, tokenizer, items, todo, emit, bar, namm_scorers, seed=seed, matched=matched,
                    baseline_eviction=baseline_eviction, recall=recall, recall_only=recall_only, **options,
                )
            else:
                for run in runs:
                    if shared and run.policy not in NAMM_POLICIES:
                        continue
                    groups: dict[tuple, list] = {}
                    for r, item in todo:
                        if r == run:
                            groups.setdefault(budget_of(run, item), []).append(item)
                    for (keep_fraction, max_kv_size), group in groups.items():
                        scorer = _make_scorer(run.policy, namm_scorers.get(run.policy), seed)
                        attach(model, scorer, max_kv_size=max_kv_size, keep_fraction=keep_fraction)
                        try:
                            for item in group:
                                bar.show(f"{item['_id']} {run.label}")
                                record = evaluate_item(
                                    model, tokenizer, item, run, keep_fraction=keep_fraction, max_kv_size=max_kv_size, **options
                                )
                                emit(record, item, run)
                        finally:
                            detach(model)
                if shared and any(r.policy not in NAMM_POLICIES for r, _ in todo):
                    attach(model, shared_prefill_scorer())
                    try:
                        for item in items:
                            item_runs = [r for r, i in todo if i is item and r.policy not in NAMM_POLICIES]
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
    return write_results(
        out, runs, items, config=config, baseline_eviction=baseline_eviction, protocol=protocol, recall_only=recall_only
    )


def _agnostic_loop(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    todo: Sequence[tuple[PolicyRun, Mapping[str, Any]]],
    emit: Callable[[dict[str, Any], Mapping[str, Any], PolicyRun], None],
    bar: Progress,
    namm_scorers: Mapping[str, Any],
    *,
    seed: int,
    matched: Callable[[], dict[str, dict[str, float]]],
    baseline_eviction: str,
    recall: bool,
    recall_only: bool,
    context_limit: int | None,
    max_tokens: int | None,
    templates: Mapping[str, str] | None,
    prefill_step_size: int,
) -> None:
    """The query-agnostic pairs, item by item: one split prompt and one full-cache
    recording per item serve all of its runs (recall-only runs replay it instead
    of running the model). With matched budgets the NAMM's own runs go first over
    every item (a matched budget is a mean over items)."""
    from ..integration import attach, detach

    first = [(r, i) for r, i in todo if r.policy == "namm" and r.budget is None]
    phases = [first, [(r, i) for r, i in todo if not (r.policy == "namm" and r.budget is None)]]
    if not any(r.budget is not None and r.budget.match for r, _ in todo):
        phases = [list(todo)]
    for phase in phases:
        for item in items:
            item_runs = [r for r, i in phase if i is item]
            if not item_runs:
                continue
            dataset = item.get("dataset", "")
            limit = max_tokens or max_new_tokens(dataset)
            split = split_prompt(tokenizer, item, context_limit - limit if context_limit else None, templates)
            bar.show(f"{item['_id']} full-cache attention")
            future, recorded = record_future(model, tokenizer, item, split, keep=recall_only) if recall else (None, None)
            for run in item_runs:
                needs_match = run.budget is not None and run.budget.match
                max_kv_size = document_budget(
                    run, dataset, len(split.document), matched() if needs_match else None, item.get("length")
                )
                one_shot = baseline_eviction == "prompt" and run.policy not in (*NAMM_POLICIES, "full")
                scorer = _make_scorer(
                    run.policy, namm_scorers.get(run.policy), seed,
                    one_shot=one_shot, ranked=run.budget is not None, interval=INTERVAL,
                )
                eviction = _schedule(run.policy, baseline_eviction, "agnostic", recall_only)
                bar.show(f"{item['_id']} {run.label}")
                if recall_only:
                    if recorded is None:
                        raise EvalError(f"item {item['_id']} has an empty document: nothing to measure recall on")
                    record = evaluate_item_replayed(
                        item, run, split, recorded, future, scorer, max_kv_size=max_kv_size, eviction=eviction
                    )
                else:
                    attach(model, scorer, max_kv_size=max_kv_size)
                    try:
                        record = evaluate_item_agnostic(
                            model, tokenizer, item, run, split, limit, max_kv_size=max_kv_size, eviction=eviction,
                            future=future, prefill_step_size=prefill_step_size,
                        )
                    finally:
                        detach(model)
                emit(record, item, run)
            del future, recorded
            mx.clear_cache()


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
    from .plot import POLICY_COLORS, plot_score_vs_kept

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
        "legend": {p: POLICY_COLORS.get(p) for p in dict.fromkeys(r.policy for r in runs)},
        "plot": PLOT,
    }
    plotted = plot_score_vs_kept([o for o in summary["overall"] if o["score"] is not None], out / PLOT)
    if not plotted:
        results["plot"] = None
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / RESULTS)
    return results
