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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import mlx.core as mx
import numpy as np

from ..policies import make_scorer
from ..progress import StatusLine, format_duration, remaining
from .item import (
    evaluate_item,
    evaluate_item_agnostic,
    evaluate_item_replayed,
    evaluate_item_shared,
    record_future,
    shared_prefill_scorer,
)
from .plan import (
    BASELINE_EVICTION,
    INTERVAL,
    NAMM_POLICIES,
    PROTOCOLS,
    EvalError,
    PolicyRun,
    document_budget,
    effective_budget,
    matched_budgets,
    policy_of,
)
from .report import write_results
from .metrics import max_new_tokens
from .query_agnostic import split_prompt
from .store import PREDICTIONS, _schedule, pair_key, pending_pairs, read_predictions

# Also importable from here (the loop's module) as they were before plan/store/item/report were split off.
from .item import generate_answer, prepare_prompt  # noqa: E402, F401
from .report import format_table  # noqa: E402, F401
from .store import item_hash  # noqa: E402, F401

# --------------------------------------------------------------------------- progress


class Progress:
    """The evaluation status line: a bar, counts, the current pair, elapsed time
    and an ETA (from the prompt tokens done so far; ``weights`` per pair)."""

    def __init__(self, weights: Sequence[float], stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = sum(weights) or 1.0
        self.count = len(weights)
        self.done = 0.0
        self.finished = 0
        self.start = time.perf_counter()
        self.line = StatusLine(enabled and self.count > 0, stream)

    def show(self, what: str) -> None:
        if not self.line.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = remaining(elapsed, self.done, self.total)
        filled = int(24 * self.done / self.total)
        self.line.show(
            f"eval [{'#' * filled}{'-' * (24 - filled)}] {self.finished}/{self.count}  {what[:48]:<48}  "
            f"elapsed {format_duration(elapsed)}  eta {format_duration(eta)}"
        )

    def advance(self, weight: float, what: str) -> None:
        self.done += weight
        self.finished += 1
        self.show(what)

    def close(self) -> None:
        self.line.close()


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
    if policy in NAMM_POLICIES:
        return make_scorer("namm", namm=namm_scorer, ranked=True) if ranked else make_scorer("namm", namm=namm_scorer)
    seed_param = policy_of(policy).seed_param
    params: dict[str, Any] = {seed_param: seed} if seed_param else {}
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
    from ..integration import as_scorer

    _check_protocol(baseline_eviction, protocol, recall, recall_only)
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
    budgets = _Budgets(pred_path, plan_keys, baseline_eviction)
    options = dict(context_limit=context_limit, max_tokens=max_tokens, templates=templates, prefill_step_size=prefill_step_size)
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
                    model, tokenizer, items, todo, emit, bar, namm_scorers, seed=seed, matched=budgets.matched,
                    baseline_eviction=baseline_eviction, recall=recall, recall_only=recall_only, **options,
                )
            else:
                _aware_loop(model, tokenizer, items, runs, todo, emit, bar, namm_scorers, budgets, seed, shared, options)
    finally:
        bar.close()
    return write_results(
        out, runs, items, config=config, baseline_eviction=baseline_eviction, protocol=protocol, recall_only=recall_only
    )


def _check_protocol(baseline_eviction: str, protocol: str, recall: bool, recall_only: bool) -> None:
    if baseline_eviction not in BASELINE_EVICTION:
        raise EvalError(f"baseline eviction must be one of {', '.join(BASELINE_EVICTION)}, got {baseline_eviction!r}")
    if protocol not in PROTOCOLS:
        raise EvalError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if recall_only and (protocol != "agnostic" or not recall):
        raise EvalError("recall-only evaluation needs the query-agnostic protocol with recall")


class _Budgets:
    """Each run's budget on an item; a budget matched to the NAMM's is looked up
    in this plan's finished NAMM pairs, read once, when first needed."""

    def __init__(self, pred_path: Path, plan_keys: set[tuple], baseline_eviction: str) -> None:
        self.pred_path, self.plan_keys, self.baseline_eviction = pred_path, plan_keys, baseline_eviction
        self.table: dict[str, dict[str, float]] = {}

    def matched(self) -> dict[str, dict[str, float]]:
        if not self.table:  # first asked once the NAMM's pairs are all done
            current = [r for r in read_predictions(self.pred_path) if pair_key(r) in self.plan_keys]
            self.table.update(matched_budgets(current))
        return self.table

    def of(self, run: PolicyRun, item: Mapping[str, Any]) -> tuple[float | None, int | None]:
        table = self.matched() if run.budget is not None and run.budget.match else None
        return effective_budget(run, item.get("dataset", ""), table, self.baseline_eviction, item.get("length"))


def _aware_loop(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    runs: Sequence[PolicyRun],
    todo: Sequence[tuple[PolicyRun, Mapping[str, Any]]],
    emit: Callable[[dict[str, Any], Mapping[str, Any], PolicyRun], None],
    bar: Progress,
    namm_scorers: Mapping[str, Any],
    budgets: _Budgets,
    seed: int,
    shared: bool,
    options: Mapping[str, Any],
) -> None:
    """The question-aware protocol: each run's pairs grouped by budget under one
    attached scorer; with ``shared``, every baseline forks one prefill per item."""
    from ..integration import attach, detach

    for run in runs:
        if shared and run.policy not in NAMM_POLICIES:
            continue
        groups: dict[tuple, list] = {}
        for r, item in todo:
            if r == run:
                groups.setdefault(budgets.of(run, item), []).append(item)
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
    if not (shared and any(r.policy not in NAMM_POLICIES for r, _ in todo)):
        return
    attach(model, shared_prefill_scorer())
    try:
        for item in items:
            item_runs = [r for r, i in todo if i is item and r.policy not in NAMM_POLICIES]
            if not item_runs:
                continue
            bar.show(f"{item['_id']} prefill")
            planned = [
                (r, _make_scorer(r.policy, None, seed, one_shot=r.policy != "full"), *budgets.of(r, item))
                for r in item_runs
            ]
            for run, record in zip(item_runs, evaluate_item_shared(model, tokenizer, item, planned, **options)):
                emit(record, item, run)
    finally:
        detach(model)


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
