"""Prompts for evaluation items: the chat template around "document, then question",
LongBench-style middle truncation, and the token budget of a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..session import DOCUMENT_TEMPLATE

#: LongBench feeds these datasets without the chat template (few-shot and code
#: completion prompts), as its ``pred.py`` does.
NO_CHAT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})


def load_prompt_templates(path: str | Path) -> dict[str, str]:
    """A ``{dataset: template}`` JSON file with ``{context}`` and ``{input}`` fields,
    e.g. LongBench's ``config/dataset2prompt.json``."""
    try:
        templates = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read prompt templates {path}: {err}") from None
    if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
        raise ValueError(f"{path} must map dataset names to template strings")
    return templates


def user_text(item: Mapping[str, Any], templates: Mapping[str, str] | None = None) -> str:
    """The user message: the dataset's template when one is given, else the
    document-then-question template of ``namm chat``."""
    from .metrics import base_dataset

    template = (templates or {}).get(item.get("dataset", "")) or (templates or {}).get(
        base_dataset(item.get("dataset", ""))
    )
    if template:
        return template.format(context=item["context"], input=item.get("input", ""))
    return DOCUMENT_TEMPLATE.format(document=item["context"], question=item.get("input", ""))


def wrap_chat(
    tokenizer: Any, text: str, dataset: str = "", templates: Mapping[str, str] | None = None
) -> tuple[str, bool]:
    """``(prompt, used_chat_template)``: the chat template around ``text`` (generation
    prompt added). With LongBench templates, the few-shot/code datasets stay raw
    text, as in LongBench; so does everything for a tokenizer without a template."""
    from .metrics import base_dataset

    if templates and base_dataset(dataset) in NO_CHAT_DATASETS:
        return text, False
    if getattr(tokenizer, "chat_template", None) is None:
        return text, False
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _add_bos(tokenizer: Any, ids: list[int], chat: bool) -> list[int]:
    """Raw (non-chat) prompts get the BOS token as LongBench's tokenizer call does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if chat or bos is None or (ids and ids[0] == bos):
        return ids
    return [bos] + ids


def middle_truncate(tokenizer: Any, text: str, budget: int) -> str:
    """LongBench's truncation: keep the first and last ``budget // 2`` tokens of
    ``text`` (decoded back to text and concatenated)."""
    ids = encode(tokenizer, text)
    if len(ids) <= budget:
        return text
    half = max(budget // 2, 0)
    head = tokenizer.decode(ids[:half]) if half else ""
    tail = tokenizer.decode(ids[len(ids) - half :]) if half else ""
    return head + tail


def prompt_tokens(
    tokenizer: Any,
    item: Mapping[str, Any],
    max_prompt_tokens: int | None = None,
    templates: Mapping[str, str] | None = None,
) -> tuple[list[int], bool]:
    """Token ids of the full prompt for ``item`` and whether it was truncated.

    Too-long prompts are middle-truncated like LongBench: the user message (not
    the chat-template wrapper) loses its middle until the whole prompt fits in
    ``max_prompt_tokens``.
    """
    dataset = item.get("dataset", "")
    text = user_text(item, templates)
    wrapped, chat = wrap_chat(tokenizer, text, dataset, templates)
    ids = _add_bos(tokenizer, encode(tokenizer, wrapped), chat)
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return ids, False
    overhead = len(ids) - len(encode(tokenizer, text))
    budget = max_prompt_tokens - overhead
    for _ in range(8):  # re-tokenising the joined halves can add a token or two
        if budget < 2:
            raise ValueError(f"a prompt budget of {max_prompt_tokens} tokens leaves no room for the document")
        truncated = middle_truncate(tokenizer, text, budget)
        ids = _add_bos(tokenizer, encode(tokenizer, wrap_chat(tokenizer, truncated, dataset, templates)[0]), chat)
        if len(ids) <= max_prompt_tokens:
            return ids, True
        budget -= len(ids) - max_prompt_tokens
    raise ValueError(f"could not truncate a prompt to {max_prompt_tokens} tokens")


def context_limit_of(model: Any, config: Mapping[str, Any] | None = None) -> int | None:
    """The model's trained context length (config, else the model's args)."""
    from ..session import context_limit

    if config:
        limit = context_limit(dict(config))
        if limit:
            return limit
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(args, key, None)
        if isinstance(value, int):
            return value
    return None


def document_and_question(tokenizer: Any, item: Mapping[str, Any], granularity: int = 16) -> tuple[list[int], list[int]]:
    """``(document tokens, question tokens)`` as ``namm chat`` feeds them: the
    chat template up to and including the document first, the question and the
    rest of the template afterwards, so nothing compressed before the question
    depends on it.

    The document part is cut to a multiple of ``granularity`` tokens (the
    NAMM's hop: a step at the document's end needs whole STFT frames); the cut
    tokens (the template's blank line after the document) join the question.
    """
    from ..session import first_turn_parts

    before, after = first_turn_parts(tokenizer, item["context"])
    document = encode(tokenizer, before)
    question = encode(tokenizer, str(item.get("input", "")) + after)
    cut = len(document) - len(document) % granularity
    return document[:cut], document[cut:] + question
