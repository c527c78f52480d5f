"""Query-agnostic evaluation: the document is read and compressed before the question.

``namm chat`` prefills the chat-templated text up to and including the document,
evicting as it goes, and only then sees a question; one compressed document
serves every question. Evaluating a policy with the question already inside the
compressed text favours question-aware policies (SnapKV's observation window
would sit on the question), so this is the default protocol of ``namm eval``.

An item's prompt is split into a document part (everything before the question)
and a question part (the question and the rest of the chat template). The
document part is cut to a multiple of the NAMM's hop (16 tokens; the few tokens
cut off go to the question side) so that a final eviction step can run at its
very end: :func:`read_document` prefills it in 512-aligned chunks with the
policy's caches, evicting every 512 tokens, and then runs that one step, so the
question meets a cache already within its budget. :func:`replay_document`
gets a policy's kept sets from a full-cache recording instead, without the
model (for recall-only evaluation of many items).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import mlx.core as mx
import numpy as np

from ..errors import NammError
from ..cache import EvictingKVCache, evict_now
from ..prefill import prefill
from .prompts import _add_bos, document_and_question, encode, middle_truncate, user_text, wrap_chat

if TYPE_CHECKING:
    from .recall import KeptSnapshot

#: The document part is a multiple of this many tokens (the NAMM's STFT hop:
#: a NAMM step needs a whole number of hops of new tokens).
HOP = 16
#: Stands for the question while the prompt is split (a private-use character).
_SENTINEL = "\ue000QUESTION\ue000"


class QueryAgnosticError(NammError, ValueError):
    """The item's prompt cannot be split into document then question."""


@dataclass(frozen=True)
class SplitPrompt:
    """An item's prompt tokens as document part then question part.

    document: the tokens read and compressed before the question (a multiple of
    :data:`HOP`). question: the rest, ending with the generation prompt.
    """

    document: list[int]
    question: list[int]
    truncated: bool

    @property
    def tokens(self) -> list[int]:
        return self.document + self.question


def _templated_texts(
    tokenizer: Any, item: Mapping[str, Any], templates: Mapping[str, str] | None
) -> tuple[str, str, bool]:
    """``(before, after, chat)`` for a LongBench template or a tokenizer without a
    chat template: the final prompt text split at the question's place."""
    text = user_text({**item, "input": _SENTINEL}, templates)
    wrapped, chat = wrap_chat(tokenizer, text, item.get("dataset", ""), templates)
    if wrapped.count(_SENTINEL) != 1:
        raise QueryAgnosticError(
            f"item {item.get('_id', '?')}: its prompt template does not hold the question exactly once; "
            "evaluate it with --query-aware"
        )
    before, after = wrapped.split(_SENTINEL)
    if item.get("context") and item["context"] not in before:
        raise QueryAgnosticError(
            f"item {item.get('_id', '?')}: its prompt template puts the question before the document, "
            "so the document cannot be read first; evaluate it with --query-aware"
        )
    return before, str(item.get("input", "")) + after, chat


def _split_tokens(
    tokenizer: Any, item: Mapping[str, Any], templates: Mapping[str, str] | None
) -> tuple[list[int], list[int]]:
    """Document and question tokens. Without a dataset template and with a chat
    template this is exactly what ``namm chat`` feeds
    (:func:`namm_mlx.eval.prompts.document_and_question`, from
    :func:`namm_mlx.session.first_turn_parts`); LongBench templates and
    template-less tokenizers are split the same way, at the question's place."""
    from .metrics import base_dataset

    dataset = item.get("dataset", "")
    templated = bool(templates) and bool(templates.get(dataset) or templates.get(base_dataset(dataset)))
    if not templated and getattr(tokenizer, "chat_template", None) is not None:
        return document_and_question(tokenizer, item, HOP)
    before, after, chat = _templated_texts(tokenizer, item, templates)
    document = _add_bos(tokenizer, encode(tokenizer, before), chat)
    question = encode(tokenizer, after)
    cut = len(document) - len(document) % HOP
    return document[:cut], document[cut:] + question


def split_prompt(
    tokenizer: Any,
    item: Mapping[str, Any],
    max_prompt_tokens: int | None = None,
    templates: Mapping[str, str] | None = None,
) -> SplitPrompt:
    """The item's prompt as document part then question part.

    A prompt longer than ``max_prompt_tokens`` loses the middle of its document
    (LongBench's truncation, applied to the context alone so the question and
    template stay whole) until it fits.
    """
    document, question = _split_tokens(tokenizer, item, templates)
    if max_prompt_tokens is None or len(document) + len(question) <= max_prompt_tokens:
        return SplitPrompt(document, question, False)
    context = item["context"]
    budget = len(encode(tokenizer, context)) - (len(document) + len(question) - max_prompt_tokens)
    for _ in range(8):  # re-tokenising the joined halves can add a token or two
        if budget < 2:
            raise QueryAgnosticError(f"a prompt budget of {max_prompt_tokens} tokens leaves no room for the document")
        shorter = {**item, "context": middle_truncate(tokenizer, context, budget)}
        document, question = _split_tokens(tokenizer, shorter, templates)
        excess = len(document) + len(question) - max_prompt_tokens
        if excess <= 0:
            return SplitPrompt(document, question, True)
        budget -= excess
    raise QueryAgnosticError(f"could not truncate a prompt to {max_prompt_tokens} tokens")


def read_document(
    model: Any, caches: list[Any], document: Sequence[int], step: int = 512, trace: bool = False
) -> list[Any] | None:
    """Prefill ``document`` into ``caches`` and compress it before any question.

    The prefill runs in ``step``-aligned chunks (the policy evicts every 512
    tokens, as in chat); then every layer holding tokens no step has seen yet
    runs one step at the document's end (``evict_now``), so the kept set is
    final before the question arrives. Layers whose last cadence step fell on
    the document's end already are not stepped twice (a second NAMM step with no
    new tokens would age its state). With ``trace`` it returns the kept-position
    snapshots after every step (:mod:`namm_mlx.eval.recall`), the last one at the
    document's end; otherwise None.
    """
    from .recall import prefill_with_trace, snapshot

    if not trace:
        prefill(model, caches, document, step)
        evict_now(caches)
        return None
    snapshots = prefill_with_trace(model, caches, document, step)
    if evict_now(caches) or not snapshots:
        snapshots.append(snapshot(caches))
    return snapshots


def kept_digest(caches: Sequence[Any]) -> str:
    """Short hash of every evicting layer's kept positions: two runs kept the same
    tokens exactly when their digests match."""
    digest = hashlib.sha256()
    for cache in caches:
        if isinstance(cache, EvictingKVCache) and cache.keys is not None:
            positions = cache.positions()
            mx.eval(positions)
            digest.update(np.asarray(positions, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:16]


def document_kept_fraction(caches: Sequence[Any]) -> float:
    """Kept tokens / tokens seen, over every evicting layer (at the document's end)."""
    kept = seen = 0
    for cache in caches:
        if isinstance(cache, EvictingKVCache):
            kept, seen = kept + cache.length, seen + cache.offset
    return kept / seen if seen else 1.0


def replay_document(
    recorded: Sequence[EvictingKVCache], scorer: Any, document_length: int, max_kv_size: int | None = None, step: int = 512
) -> tuple[list[KeptSnapshot], list[EvictingKVCache]]:
    """A policy's kept sets over the document, from a full-cache recording
    instead of a prefill through the model (:func:`namm_mlx.recording.replay`).

    Fresh caches under ``scorer`` and ``max_kv_size`` are fed the recorded
    keys, values and queries of the document in ``step``-aligned blocks (steps
    fire where they would online), then the step at the document's end runs as
    in :func:`read_document`. Returns the kept-position snapshots and the caches.
    A policy that evicts nothing before the document's end (full, one-shot)
    gets exactly its online kept set; an online one gets kvpress's one-shot
    approximation after its first step (later tokens' keys and queries come
    from the full cache, not from the evicted one).
    """
    from ..recording import recorded_layers

    return replay_kept_sets(
        recorded_layers(recorded), recorded[0].scale, lambda: EvictingKVCache(scorer, max_kv_size=max_kv_size),
        document_length, step,
    )


def replay_kept_sets(
    layers: Sequence[Any], scale: float, make_cache: Any, document_length: int, step: int = 512,
    layer_ids: Sequence[int] | None = None,
) -> tuple[list[KeptSnapshot], list[EvictingKVCache]]:
    """:func:`replay_document` on recorded ``(keys, values, queries)`` layers
    (any subset of a model's layers, whose indices ``layer_ids`` gives) and
    caches from ``make_cache()``."""
    from ..recording import replay
    from .recall import snapshot

    trace: list[KeptSnapshot] = []

    def after_block(caches: list[EvictingKVCache]) -> None:
        if all(c.n_new == 0 for c in caches):
            trace.append(snapshot(caches))

    caches = replay(layers, scale, make_cache, upto=document_length, step=step, on_block=after_block, layer_ids=layer_ids)
    if evict_now(caches) or not trace:
        trace.append(snapshot(caches))
    return trace, caches
