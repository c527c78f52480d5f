"""A per-layer, per-head linear probe on cached keys that marks the tokens a reader asks about.

A fact in the middle of a document (a passkey's digits, a planted number)
draws almost no attention from the text after it, so no score built from the
attention a token receives can keep it once the question is unknown. Its key
still says what kind of token it is. RoPE rotates each pair of key dimensions
by a position-dependent angle, which scrambles the raw coordinates but leaves
each pair's magnitude unchanged, so the probe reads the log magnitudes of the
``D/2`` rotated pairs: position-free, cheap, and already in the cache.

Key spaces differ between layers and heads, so each (layer, KV head) has its
own ``D/2`` weights and a bias, fitted in closed form (class-balanced ridge)
on documents whose answer tokens are known. The bias is then shifted so that
a chosen share of the training tokens scores at least 0: a token scoring
``>= 0`` is "marked", and a NAMM with a probe keeps marked tokens ahead of
everything else.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import mlx.core as mx
import numpy as np

#: Tokens at the start of a document (the attention sink and the instructions)
#: are kept by every policy anyway; they are left out of the fit.
SKIP_FIRST = 32


def pair_log_magnitudes(keys: mx.array) -> mx.array:
    """``log |(k_i, k_{i + D/2})|`` for the ``D/2`` rotate-half RoPE pairs: ``[..., N, D/2]``.

    mlx-lm's ``nn.RoPE(traditional=False)`` (every family this project
    supports) rotates dimension ``i`` with ``i + D/2``.
    """
    k = keys.astype(mx.float32)
    half = k.shape[-1] // 2
    a, b = k[..., :half], k[..., half:]
    return 0.5 * mx.log(a * a + b * b + 1e-12)


def probe_scores(keys: mx.array, probe: mx.array) -> mx.array:
    """One layer's probe scores ``[B, H, N]`` for keys ``[B, H, N, D]`` and
    the layer's probe ``[H, D/2 + 1]`` (weights, then the bias)."""
    features = pair_log_magnitudes(keys)
    weights, bias = probe[:, :-1], probe[:, -1]
    return (features * weights[None, :, None, :]).sum(-1) + bias[None, :, None]


def probe_misfit(probe: mx.array, shapes: Iterable[tuple[int, int]], layers_fit: bool = True) -> str | None:
    """Why ``probe`` cannot read keys of ``shapes`` (KV heads, head dimension),
    or None when it can. Its weights are per layer, KV head and RoPE pair, so a
    key of any other shape comes from another model."""
    heads, dim = int(probe.shape[1]), 2 * (int(probe.shape[2]) - 1)
    if layers_fit and set(shapes) <= {(heads, dim)}:
        return None
    return f"this NAMM's key probe was fitted for {probe.shape[0]} layers x {heads} KV heads of dimension {dim}"


def spread_marks(marks: mx.array, span: int) -> mx.array:
    """Marks ``[..., N]`` where each slot also takes the mark of any of the
    ``span`` slots after it (less a little per slot of distance, so the marked
    token itself ranks first): the words that introduce a fact are kept with it.
    Slots are in position order, so after evictions a slot's neighbour is the
    nearest kept token."""
    if span <= 0:
        return marks
    n = marks.shape[-1]
    pad = mx.full((*marks.shape[:-1], span), -mx.inf, dtype=marks.dtype)
    padded = mx.concatenate([marks, pad], axis=-1)
    out = marks
    for shift in range(1, span + 1):
        out = mx.maximum(out, padded[..., shift : shift + n] - 1e-3 * shift)
    return out


def layer_marks(keys: mx.array, probe: mx.array, span: int) -> mx.array:
    """What a step ranks the marked slots by: one layer's probe (``[KV heads,
    D/2 + 1]``) scored on its cached ``keys``, each mark spread over the
    ``span`` slots before it."""
    return spread_marks(probe_scores(keys, probe), span)


def protect_marked(scores: mx.array, marks: mx.array, floor: float, limit: int | None = None) -> mx.array:
    """Lift tokens whose probe score is ``>= 0`` above every other score and
    above ``floor`` (the threshold), in the order of their probe scores, so a
    budget smaller than the marked set keeps the surest marks. With ``limit``,
    only each head's ``limit`` surest marks (at least one) are lifted; the
    others keep their own score."""
    marked = marks >= 0
    if limit is not None and limit < marks.shape[-1]:
        rank = mx.argsort(mx.argsort(-marks, axis=-1), axis=-1)  # 0 = surest; every slot a distinct rank
        marked = marked & (rank < max(1, limit))
    base = mx.maximum(mx.max(scores), floor) + 1.0
    return mx.where(marked, base + marks, scores)


def document_features(model: Any, tokens: Sequence[int], step: int = 512) -> np.ndarray:
    """Pair log magnitudes ``[layers, KV heads, T, D/2]`` of a document's keys
    after a full-cache prefill (stock mlx-lm caches, logits never evaluated)."""
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    for start in range(0, len(tokens), step):
        model(mx.array(tokens[start : start + step])[None], cache=caches)
        mx.eval([c.state for c in caches])
    n = len(tokens)
    layers = [pair_log_magnitudes(c.keys[0, :, :n]) for c in caches]
    mx.eval(layers)
    return np.stack([np.asarray(x) for x in layers])


def fit_probe(
    documents: Iterable[tuple[np.ndarray, np.ndarray]],
    marked_share: float = 0.02,
    ridge: float = 1.0,
) -> np.ndarray:
    """Fit every (layer, head) probe from documents' key features and answer labels.

    documents: per document, its :func:`document_features` ``[L, H, T, D/2]``
    and a boolean ``[T]`` that is true on the answer's tokens. Returns float32
    ``[L, H, D/2 + 1]`` with biases set so that ``marked_share`` of the
    training tokens (after the first :data:`SKIP_FIRST`) score ``>= 0``.
    """
    documents = list(documents)
    if not documents:
        raise ValueError("fitting a key probe needs at least one document")
    if not 0.0 < marked_share < 1.0:
        raise ValueError(f"marked_share must be in (0, 1), got {marked_share}")
    labels = np.concatenate([np.asarray(y, bool)[SKIP_FIRST:] for _, y in documents])
    if not labels.any() or labels.all():
        raise ValueError("fitting a key probe needs answer tokens and other tokens")
    n_layers, heads, _, pairs = documents[0][0].shape
    probe = np.zeros((n_layers, heads, pairs + 1), np.float32)
    target = np.where(labels, 1.0, -1.0)
    weight = np.where(labels, 0.5 / labels.sum(), 0.5 / (~labels).sum())
    for layer in range(n_layers):
        for head in range(heads):
            x = np.concatenate([f[layer, head, SKIP_FIRST:] for f, _ in documents]).astype(np.float64)
            mean, std = x.mean(0), x.std(0) + 1e-6
            z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
            gram = (z * weight[:, None]).T @ z + ridge / len(z) * np.eye(z.shape[1])
            coef = np.linalg.solve(gram, (z * weight[:, None]).T @ target)
            w = coef[:-1] / std  # fold the standardisation into raw-feature weights
            b = coef[-1] - float((mean / std) @ coef[:-1])
            b -= np.quantile(x @ w + b, 1.0 - marked_share)
            probe[layer, head, :-1], probe[layer, head, -1] = w, b
    return probe
