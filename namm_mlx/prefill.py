"""Feed a prompt through a model and its caches in cadence-aligned chunks.

Every caller (chat sessions, the evaluation, likelihood fitness) prefills the
same way so eviction steps fall at the same tokens everywhere: chunk
boundaries sit on multiples of ``step`` absolute tokens (the cache's
``offset``), so a NAMM with a 512-token cadence steps exactly at 512, 1024, ...
whether the prompt arrives whole, in turns, or resumes a saved cache.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx

#: Called after each chunk with (tokens done, tokens in total).
ChunkCallback = Callable[[int, int], None]


def prefill(
    model: Any,
    cache: list[Any],
    tokens: Sequence[int],
    step: int = 512,
    logits: str = "none",
    on_chunk: ChunkCallback | None = None,
) -> mx.array | None:
    """Run ``tokens`` through ``model`` into ``cache`` in chunks whose
    boundaries sit on multiples of ``step`` absolute tokens.

    logits: ``"none"``, ``"last"`` (the last position's ``[V]``) or ``"all"``
    (``[len(tokens), V]``, float32). The cache state is evaluated after every
    chunk, so memory holds one chunk's activations at a time.
    """
    if logits not in ("none", "last", "all"):
        raise ValueError(f"logits must be 'none', 'last' or 'all', got {logits!r}")
    out: list[mx.array] = []
    done = 0
    while done < len(tokens):
        offset = cache[0].offset if cache else 0
        n = min(step - offset % step, len(tokens) - done)
        y = model(mx.array([list(tokens[done : done + n])]), cache=cache)
        if logits == "all":
            out.append(y[0].astype(mx.float32))
        elif logits == "last" and done + n == len(tokens):
            out.append(y[0, -1].astype(mx.float32))
        mx.eval(out, [c.state for c in cache])
        done += n
        if on_chunk is not None:
            on_chunk(done, len(tokens))
    if logits == "none" or not out:
        return None
    return out[-1] if logits == "last" else mx.concatenate(out, axis=0)
