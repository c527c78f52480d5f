"""Where an item's answer sits in its document, by token ids.

Fact survival (how much of the answer a compressed cache still holds) and the
key probe's labels both need the answer's own tokens in the document. An
answer may be tokenised with or without a leading space, so both spellings
are tried and the first that occurs wins.
"""

from __future__ import annotations

from typing import Any, Sequence


def find_positions(document: Sequence[int], answer_tokens: Sequence[Sequence[int]]) -> list[int]:
    """Document positions of the first occurrence of each answer's tokens."""
    document = list(document)
    found: list[int] = []
    for tokens in answer_tokens:
        tokens = list(tokens)
        n = len(tokens)
        for start in range(len(document) - n + 1):
            if document[start : start + n] == tokens:
                found.extend(range(start, start + n))
                break
    return found


def answer_positions(tokenizer: Any, document: Sequence[int], answers: Sequence[str]) -> list[int]:
    """Sorted document positions of every answer's tokens (each answer once)."""
    from .prompts import encode

    positions: list[int] = []
    for answer in answers:
        for variant in (" " + answer, answer):
            hit = find_positions(document, [encode(tokenizer, variant)])
            if hit:
                positions.extend(hit)
                break
    return sorted(set(positions))
