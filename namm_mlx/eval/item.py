"""One item through one policy (or several sharing one prefill): prefill,
eviction, the answer, its score, the cache's statistics and the recall."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping, Sequence

import mlx.core as mx

from ..cache import EvictingKVCache, evict_now
from ..policies import H2OScorer
from ..prefill import prefill
from .metrics import max_new_tokens, metric_name, score_prediction
from .prompts import encode, prompt_tokens
from .query_agnostic import SplitPrompt, document_kept_fraction, kept_digest, read_document, replay_document
from .plan import INTERVAL, SHARED_QUERY_ROWS, PolicyRun, policy_of
from .store import _schedule, item_hash

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
    out = generate_answer(model, tokenizer, prompt, limit, policy_of(run.policy).one_shot_default, prefill_step_size)
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
