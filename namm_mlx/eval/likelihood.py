"""Likelihood of reference answers under an (evicted) KV cache: a cheap score
with no generation, for evolution fitness on CPU.

The prompt is prefilled through the cache in chunks aligned to 512 absolute
tokens (:func:`namm_mlx.prefill.prefill`, as a chat session does, so eviction
steps fall where they would in a chat), then the answer tokens are teacher-forced through
the same cache; the log-softmax of the logits at each answer position gives the
answer's log-probability.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..prefill import prefill
from .prompts import encode, prompt_tokens

CacheFactory = Callable[[], list[Any]]


class LogProb(float):
    """The summed log-probability of an answer (a float), with ``mean`` (per
    token) and ``tokens`` (answer length) attached."""

    mean: float
    tokens: int

    def __new__(cls, total: float, tokens: int) -> "LogProb":
        obj = super().__new__(cls, total)
        obj.tokens = int(tokens)
        obj.mean = total / tokens if tokens else 0.0
        return obj

    @property
    def sum(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"LogProb(sum={float(self):.4f}, mean={self.mean:.4f}, tokens={self.tokens})"

    def __reduce__(self):  # pickling (multiprocess fitness) keeps the extras
        return (LogProb, (float(self), self.tokens))


def target_logprob(logits: mx.array, target: Sequence[int]) -> LogProb:
    """Log-probability of ``target`` under ``logits`` ``[len(target), vocab]``
    (row ``i`` predicts ``target[i]``), in the logits' own dtype."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, mx.array(target)[:, None], axis=-1)
    return LogProb(float(picked.sum().item()), len(target))


def full_cache_factory(model: Any) -> CacheFactory:
    """Fresh non-evicting caches for ``model`` (its own ``make_cache``, even when
    a NAMM is attached), for the full-cache reference."""
    base = getattr(type(model), "make_cache", None)

    def make() -> list[Any]:
        return base(model) if base else [KVCache() for _ in model.layers]

    return make


def reference_answer(item: Mapping[str, Any]) -> str:
    """The answer text to score: ``item["reference"]`` if set, else the first answer."""
    if item.get("reference"):
        return str(item["reference"])
    answers = item.get("answers") or []
    if isinstance(answers, str):
        return answers
    if not answers:
        raise ValueError(f"item {item.get('_id', '?')} has no reference answer")
    return str(answers[0])


def answer_logprob(
    model: Any,
    tokenizer: Any,
    item: Mapping[str, Any],
    cache_factory: CacheFactory,
    *,
    answer: str | None = None,
    after_prefill: Callable[[list[Any]], Any] | None = None,
    prefill_step_size: int = 512,
    max_prompt_tokens: int | None = None,
    templates: Mapping[str, str] | None = None,
) -> LogProb:
    """Log-probability of the reference answer of ``item`` given its prompt,
    with caches from ``cache_factory()`` (e.g. ``lambda: make_prompt_cache(model)``
    after ``attach``, or ``full_cache_factory(model)``).

    after_prefill: called with the caches once the prompt is in (pass
    ``namm_mlx.cache.evict_now`` for one-shot SnapKV). The answer is
    ``reference_answer(item)`` unless given; it is encoded on its own, right
    after the chat template's generation prompt. Returns a :class:`LogProb`
    (a float: the sum; ``.mean`` per token).
    """
    prompt, _ = prompt_tokens(tokenizer, item, max_prompt_tokens, templates)
    target = encode(tokenizer, reference_answer(item) if answer is None else answer)
    if not target:
        raise ValueError(f"item {item.get('_id', '?')}: the answer encodes to no tokens")
    cache = cache_factory()
    first = prefill(model, cache, prompt, prefill_step_size, logits="last")
    if after_prefill is not None:
        after_prefill(cache)
    rows = [first[None]]
    if len(target) > 1:
        rows.append(prefill(model, cache, target[:-1], prefill_step_size, logits="all"))
    result = target_logprob(mx.concatenate(rows, axis=0), target)
    del cache
    mx.clear_cache()
    return result


def answer_logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    cache_factory: CacheFactory,
    *,
    full: Sequence[LogProb] | None = None,
    full_factory: CacheFactory | None = None,
    **kwargs: Any,
) -> list[tuple[LogProb, LogProb]]:
    """Per item ``(full, evicted)`` answer log-probabilities.

    full: previously computed full-cache values to reuse (they do not depend on
    the eviction policy; an evolution run computes them once). full_factory:
    caches for the reference (default: :func:`full_cache_factory`).
    """
    if full is not None and len(full) != len(items):
        raise ValueError(f"got {len(full)} full-cache values for {len(items)} items")
    full_factory = full_factory or full_cache_factory(model)
    kwargs_full = {k: v for k, v in kwargs.items() if k != "after_prefill"}
    pairs = []
    for i, item in enumerate(items):
        ref = full[i] if full is not None else answer_logprob(model, tokenizer, item, full_factory, **kwargs_full)
        pairs.append((ref, answer_logprob(model, tokenizer, item, cache_factory, **kwargs)))
    return pairs
