"""One evicting KV cache for mlx-lm, shared by NAMM and every baseline policy.

``EvictingKVCache`` implements mlx-lm's cache protocol (``update_and_fetch``,
``offset``, ``make_mask``, ``state``, ``trim``, ``nbytes``, ...). It stores
post-RoPE keys/values ``[B, H, N, D]`` plus what a scorer needs per token, and
every ``scorer.interval`` absolute tokens, *after* the attention of the forward
pass that completes the block, asks its scorer for per-token scores and keeps
each head's best tokens. Policies never touch storage: they implement
:class:`Scorer` and the cache owns the gather, the budget and the bookkeeping.

Invariants:
* ``offset`` is the logical token count (RoPE position of the next token);
  positions are never renumbered, so kept keys keep their rotation.
* Every head of a layer keeps the same number of tokens: storage stays a dense
  tensor and attention needs no per-head mask ("causal" stays exact because
  every kept token precedes the new block).
* The cache is not a ``KVCache`` subclass on purpose: inheriting ``merge``
  would let mlx-lm's server batch it into a plain ``BatchKVCache``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask, quantized_scaled_dot_product_attention
from mlx_lm.models.cache import _BaseCache

from . import quantized
from .attention import attention_with_probabilities
from .errors import NammError
from .policies.base import EvictionContext, Scorer, Scores, scorer_from_spec  # noqa: F401  (Scores: re-exported)
from .selection import gather_tokens, protect_newest, top_k_in_order


#: mlx-lm's quantised attention (quantized matmuls) is for Metal; on the CPU
#: backend quantized matmuls bypass BLAS: for SmolLM2's 9/3 heads, 512 queries
#: x 4k 8-bit keys it took 3.2 s against 0.5 s for de-quantising the layer's
#: K/V and calling the fused kernel (and 8.7 vs 6.2 ms for one decoding
#: query), so the CPU does the latter; the transient is one layer's float K/V.
_QUANTIZED_KERNEL = mx.default_device() == mx.gpu


class UnsupportedModelError(NammError, RuntimeError):
    """The model's attention cannot be observed or evicted by the NAMM cache."""


class EvictingKVCache(_BaseCache):
    """A KV cache whose tokens are periodically evicted by a :class:`Scorer`.

    max_kv_size: after each step a layer keeps at most this many tokens per
    head (between steps it can grow by up to ``scorer.interval``).
    keep_fraction: after each step a layer keeps at most this fraction of the
    tokens seen so far (used to run baselines at a matched budget).
    kv_bits, kv_group_size: store the kept keys/values quantised as mlx-lm's
    ``--kv-bits`` does (see :mod:`namm_mlx.quantized`); scorers see them
    de-quantised.
    """

    step = 256

    def __init__(
        self,
        scorer: Scorer,
        max_kv_size: int | None = None,
        keep_fraction: float | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = quantized.DEFAULT_GROUP_SIZE,
        layer: int | None = None,
    ) -> None:
        if max_kv_size is not None and max_kv_size < 1:
            raise ValueError(f"max_kv_size must be at least 1, got {max_kv_size}")
        if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        quantized.check_bits(kv_bits, kv_group_size)
        self.scorer = scorer
        self.max_kv_size = max_kv_size
        self.keep_fraction = keep_fraction
        self.kv_bits = kv_bits
        self.kv_group_size = kv_group_size
        self.layer = layer  # index in the model, for scorers fitted per layer
        self.keys: quantized.Storage | None = None  # an array, or a quantised triple
        self.values: quantized.Storage | None = None
        self.offset = 0  # logical tokens seen: the RoPE position of the next token
        self.length = 0  # physical slots in use
        self.kept_positions: mx.array | None = None  # [B, H, n_old] positions kept at the last step
        self.scorer_state: list[mx.array] = []
        self.last_step_offset = 0  # offset at the last eviction step
        self.queries: mx.array | None = None  # [B, Hq, capacity, D]
        self.num_queries = 0
        self.counted_queries = 0  # oldest buffered queries an earlier step already saw
        self.scale: float | None = None
        self.steps = 0
        self._awaiting_attention = False
        self._forward_probabilities: mx.array | None = None

    # ------------------------------------------------------------ protocol
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append post-RoPE ``keys``/``values`` ``[B, H, S, D]``; return all slots."""
        if self._awaiting_attention:
            raise UnsupportedModelError(
                "the attention hook did not run after the last cache update: this model "
                "computes attention without mlx-lm's scaled_dot_product_attention, so a "
                "NAMM cannot see it (unsupported model family)"
            )
        self._awaiting_attention = True
        S = keys.shape[2]
        if self.kv_bits is not None:
            keys = quantized.quantize(keys, self.kv_group_size, self.kv_bits)
            values = quantized.quantize(values, self.kv_group_size, self.kv_bits)
        self.keys = quantized.grow(self.keys, self.length, S, self.step, keys)
        self.values = quantized.grow(self.values, self.length, S, self.step, values)
        quantized.write(self.keys, self.length, keys)
        quantized.write(self.values, self.length, values)
        self.length += S
        self.offset += S
        return quantized.head(self.keys, self.length), quantized.head(self.values, self.length)

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        scale: float,
        mask: Any,
        sinks: mx.array | None = None,
    ) -> mx.array:
        """Attention for this layer, then the eviction step when one is due.

        Called by the hook in place of mlx-lm's ``scaled_dot_product_attention``.
        When a step is due and this forward's queries are the whole block the
        scorer reads, the attention is computed explicitly and its
        probabilities go to the scorer (no second computation); every other
        forward uses the fused kernel.
        """
        if sinks is not None:
            raise UnsupportedModelError("attention sinks are not supported by the NAMM cache")
        length = quantized.capacity(keys)
        if isinstance(mask, mx.array) and mask.shape[-1] != length:
            raise UnsupportedModelError(
                "this model builds an explicit attention mask for every layer, which "
                "cannot follow per-layer eviction (unsupported model family)"
            )
        if self._takes_probabilities(queries, mask):
            keys, values = (quantized.dequantize(x, self.kv_group_size, self.kv_bits) for x in (keys, values))
            dtype = getattr(self.scorer, "attention_dtype", "float32")
            out, self._forward_probabilities = attention_with_probabilities(queries, keys, values, scale, dtype)
        elif isinstance(keys, tuple) and _QUANTIZED_KERNEL:
            out = quantized_scaled_dot_product_attention(
                queries, keys, values, scale=scale, mask=mask, group_size=self.kv_group_size, bits=self.kv_bits
            )
        else:
            keys, values = (quantized.dequantize(x, self.kv_group_size, self.kv_bits) for x in (keys, values))
            out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
        self.observe(queries, scale)
        return out

    def _takes_probabilities(self, queries: mx.array, mask: Any) -> bool:
        """Whether this forward's attention can serve the step that follows it:
        a step is due, the scorer reads every new query (no ``query_rows``
        window), and the block's queries are exactly this forward's."""
        L = queries.shape[2]
        return (
            self._awaiting_attention
            and L > 1
            and isinstance(mask, str)
            and mask == "causal"
            and self.scorer.needs_queries
            and getattr(self.scorer, "query_rows", None) is None
            and self.num_queries == 0
            and self.n_new == L
            and self._step_due()
        )

    def observe(self, queries: mx.array, scale: float) -> None:
        """Record the queries of this forward and run a step if one is due.

        A second call for the same update (layers sharing a KV cache) is ignored.
        """
        if not self._awaiting_attention:
            return
        self._awaiting_attention = False
        self.scale = float(scale)
        # Queries whose probabilities the forward already handed over need no
        # buffer, unless the scorer keeps some across steps (retain_queries).
        taken = self._forward_probabilities is not None and not getattr(self.scorer, "retain_queries", 0)
        if self.scorer.needs_queries and not taken:
            self._buffer_queries(queries)
        if self._step_due():
            self.evict()

    def _buffer_queries(self, queries: mx.array) -> None:
        """Append to the query buffer, keeping only the newest ``scorer.query_rows``
        rows when the scorer says it needs no more (SnapKV's window, TOVA's last query)."""
        L = queries.shape[2]
        growth = min(self.scorer.interval, 2 * self.step)
        self.queries = quantized.grow(self.queries, self.num_queries, L, growth, queries)
        self.queries[:, :, self.num_queries : self.num_queries + L] = queries
        self.num_queries += L
        rows = getattr(self.scorer, "query_rows", None)
        if rows is not None and self.num_queries >= 2 * rows + self.step:
            self.queries = self.queries[:, :, self.num_queries - rows : self.num_queries]
            self.counted_queries = max(0, self.counted_queries - (self.num_queries - rows))
            self.num_queries = rows

    def _step_due(self) -> bool:
        """A step runs once the absolute count reaches (or has passed) a multiple
        of the interval, as soon as the new block is a multiple of the granularity."""
        interval = self.scorer.interval
        new = self.offset - self.last_step_offset
        crossed = self.offset // interval > self.last_step_offset // interval
        return new > 0 and crossed and new % self.scorer.granularity == 0

    @property
    def n_new(self) -> int:
        """Slots appended since the last step (always the last ones)."""
        return self.offset - self.last_step_offset

    def positions(self) -> mx.array:
        """Absolute positions ``[B, H, length]`` of every slot."""
        B, H = quantized.arrays(self.keys)[0].shape[:2]
        new = mx.arange(self.last_step_offset, self.offset, dtype=mx.int32)
        new = mx.broadcast_to(new, (B, H, self.n_new))
        if self.kept_positions is None:
            return new
        return mx.concatenate([self.kept_positions, new], axis=-1)

    def keep_limit(self) -> int:
        """Most tokens per head this layer may keep after a step."""
        limit = self.length
        if self.max_kv_size is not None:
            limit = min(limit, self.max_kv_size)
        if self.keep_fraction is not None:
            limit = min(limit, max(1, math.ceil(self.keep_fraction * self.offset)))
        return max(1, limit)

    def evict(self) -> None:
        """Score every slot, keep each head's best, gather storage and state."""
        keys = quantized.head(self.keys, self.length)
        values = quantized.head(self.values, self.length)
        positions = self.positions()
        probabilities, self._forward_probabilities = self._forward_probabilities, None
        n_taken = 0 if probabilities is None else probabilities.shape[2]
        context = EvictionContext(
            keys=quantized.dequantize(keys, self.kv_group_size, self.kv_bits),
            positions=positions,
            n_new=self.n_new,
            offset=self.offset,
            state=self.scorer_state,
            queries=None if self.queries is None else self.queries[:, :, : self.num_queries],
            scale=self.scale,
            new_queries=self.num_queries - self.counted_queries if self.num_queries else n_taken,
            probabilities=probabilities,
            probabilities_dtype=getattr(self.scorer, "attention_dtype", "float32"),
            layer=self.layer,
            budget=None if self.max_kv_size is None and self.keep_fraction is None else self.keep_limit(),
        )
        result = self.scorer.score(context)
        del context, probabilities  # the probabilities are the step's largest transient
        keep = min(self.length if result.keep is None else result.keep, self.keep_limit())
        keep = max(1, keep)
        if keep < self.length:
            kept = top_k_in_order(protect_newest(result.scores), keep)
            self.keys, self.values = quantized.gather(keys, kept), quantized.gather(values, kept)
            self.kept_positions = gather_tokens(positions, kept)
            self.scorer_state = [gather_tokens(s, kept) for s in result.state]
            self.length = keep
        else:
            self.kept_positions = positions
            self.scorer_state = list(result.state)
        self.last_step_offset = self.offset
        # Retained queries stay aligned with the last slots only when nothing
        # was evicted, so they are kept only then.
        retain = min(getattr(self.scorer, "retain_queries", 0), self.num_queries) if keep >= self.length else 0
        if retain:
            self.queries = self.queries[:, :, self.num_queries - retain : self.num_queries]
        else:
            self.queries = None  # a block's buffer (Hq x 512 x D) is not held between blocks
        self.num_queries = self.counted_queries = retain
        self.steps += 1
        mx.eval(quantized.arrays(self.keys), quantized.arrays(self.values), self.kept_positions, self.scorer_state, self.queries)

    def fork(
        self, scorer: Scorer, max_kv_size: int | None = None, keep_fraction: float | None = None
    ) -> "EvictingKVCache":
        """A new cache holding this one's tokens and buffered queries, under
        ``scorer`` and its own budget; this cache is left untouched.

        One prefill can then serve many one-shot policies: fork it once per
        policy and budget and run ``evict_now`` on each fork. The scorer state
        is carried only to a scorer of the same policy (an H2O fork continues
        the attention sums an H2O prefill accumulated); a policy that
        ``needs_own_state`` cannot be forked from another policy's cache, and
        the others start without state.
        """
        rows = getattr(scorer, "query_rows", None)
        if scorer.needs_queries and rows is not None and self.num_queries < min(rows, self.offset):
            raise ValueError(
                f"the fork's scorer needs the last {rows} queries but only {self.num_queries} are buffered: "
                f"give the source scorer retain_queries >= {rows}"
            )
        other = EvictingKVCache(
            scorer, max_kv_size=max_kv_size, keep_fraction=keep_fraction,
            kv_bits=self.kv_bits, kv_group_size=self.kv_group_size, layer=self.layer,
        )  # fmt: skip
        live = lambda a, n: None if a is None else a[:, :, :n]  # noqa: E731  (new arrays: no shared writes)
        other.keys, other.values = quantized.head(self.keys, self.length), quantized.head(self.values, self.length)
        other.queries = live(self.queries, self.num_queries) if scorer.needs_queries else None
        other.num_queries = self.num_queries if other.queries is not None else 0
        other.counted_queries = self.counted_queries if other.queries is not None else 0
        other.offset, other.length = self.offset, self.length
        other.kept_positions = self.kept_positions
        other.last_step_offset, other.steps, other.scale = self.last_step_offset, self.steps, self.scale
        same_policy = scorer.spec().get("policy") == self.scorer.spec().get("policy")
        if not same_policy and self.scorer_state and getattr(scorer, "needs_own_state", False):
            raise ValueError(
                f"a {type(scorer).__name__} needs its own carried state: fork it only from a cache of its own policy"
            )
        other.scorer_state = list(self.scorer_state) if same_policy else []
        return other

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> Any:
        if window_size is not None:
            raise UnsupportedModelError("sliding-window attention layers cannot use the NAMM cache")
        if N == 1:
            return None
        if return_array:
            return create_causal_mask(N, self.length)
        return "causal"

    def is_trimmable(self) -> bool:
        """Only before the first step: afterwards the removed tokens are gone
        and the carried state would no longer match the slots."""
        return self.steps == 0

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            return 0
        n = min(self.length, n)
        self.length -= n
        self.offset -= n
        self.num_queries = max(0, self.num_queries - n)
        self.counted_queries = min(self.counted_queries, self.num_queries)
        return n

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        """Bytes actually held: storage (with its growth slack), positions,
        scorer state and the query buffer."""
        arrays = [self.kept_positions, self.queries, *self.scorer_state]
        held = sum(a.nbytes for a in arrays if a is not None)
        return held + quantized.nbytes(self.keys) + quantized.nbytes(self.values)

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the live keys and values only (comparable to a full cache's)."""
        if self.keys is None:
            return 0
        per_slot = (quantized.nbytes(self.keys) + quantized.nbytes(self.values)) // quantized.capacity(self.keys)
        return per_slot * self.length

    def to_quantized(self, group_size: int = quantized.DEFAULT_GROUP_SIZE, bits: int = 4) -> "EvictingKVCache":
        """Quantise the stored keys/values in place (mlx-lm's ``--kv-bits``
        calls this once ``--quantized-kv-start`` tokens are cached); the
        eviction bookkeeping is unchanged."""
        quantized.check_bits(bits, group_size)
        if self.kv_bits is not None:
            if (bits, group_size) != (self.kv_bits, self.kv_group_size):
                raise ValueError(
                    f"this cache is already quantised to {self.kv_bits} bits (group {self.kv_group_size})"
                )
            return self
        self.kv_bits, self.kv_group_size = bits, group_size
        if self.keys is not None:
            self.keys = quantized.quantize(self.keys[:, :, : self.length], group_size, bits)
            self.values = quantized.quantize(self.values[:, :, : self.length], group_size, bits)
        return self

    # -------------------------------------------------------- serialisation
    @property
    def meta_state(self) -> str:
        """Scalars and the scorer's description, as one JSON string."""
        return json.dumps(
            {
                "offset": self.offset,
                "length": self.length,
                "last_step_offset": self.last_step_offset,
                "num_queries": self.num_queries,
                "counted_queries": self.counted_queries,
                "scale": self.scale,
                "steps": self.steps,
                "max_kv_size": self.max_kv_size,
                "keep_fraction": self.keep_fraction,
                "kv_bits": self.kv_bits,
                "kv_group_size": self.kv_group_size,
                "layer": self.layer,
                "num_scorer_state": len(self.scorer_state),
                "scorer": self.scorer.spec(),
                "scorer_arrays": sorted(self.scorer.arrays()),
            }
        )

    @meta_state.setter
    def meta_state(self, value: str) -> None:
        meta = json.loads(value)
        self.offset = meta["offset"]
        self.length = meta["length"]
        self.last_step_offset = meta["last_step_offset"]
        self.num_queries = meta["num_queries"]
        self.counted_queries = meta.get("counted_queries", 0)
        self.scale = meta["scale"]
        self.steps = meta["steps"]
        self.max_kv_size = meta["max_kv_size"]
        self.keep_fraction = meta["keep_fraction"]
        self.kv_bits = meta.get("kv_bits")
        self.kv_group_size = meta.get("kv_group_size", quantized.DEFAULT_GROUP_SIZE)
        self.layer = meta.get("layer")
        self._awaiting_attention = False
        self._forward_probabilities = None

    @property
    def state(self) -> list[Any]:
        """Everything needed to continue generation, for ``save_prompt_cache``:
        live keys/values, kept positions, buffered queries, scorer state, the
        scorer's own arrays and (last) the JSON meta state."""
        live = lambda a, n: None if a is None else a[:, :, :n]  # noqa: E731
        scorer_arrays = self.scorer.arrays()
        return [
            quantized.head(self.keys, self.length),
            quantized.head(self.values, self.length),
            self.kept_positions,
            live(self.queries, self.num_queries) if self.num_queries else None,
            *self.scorer_state,
            *(scorer_arrays[name] for name in sorted(scorer_arrays)),
            self.meta_state,
        ]

    @state.setter
    def state(self, value: list[Any]) -> None:
        value = list(value)
        meta = json.loads(value[-1])
        self.keys, self.values, self.kept_positions, self.queries = value[:4]
        # A quantised triple comes back from a prompt-cache file as a list.
        self.keys, self.values = (tuple(x) if isinstance(x, list) else x for x in (self.keys, self.values))
        n_state = meta["num_scorer_state"]
        self.scorer_state = list(value[4 : 4 + n_state])
        arrays = dict(zip(meta["scorer_arrays"], value[4 + n_state : -1]))
        self.scorer = _restored_scorer(meta["scorer"], arrays)
        self.meta_state = value[-1]

    @classmethod
    def from_state(cls, state: list[Any], meta_state: Any = None) -> "EvictingKVCache":
        """Rebuild a saved cache (``load_prompt_cache`` skips ``__init__``) and
        make sure the attention hook is in place for it."""
        from .hook import install_hook

        install_hook()
        obj = cls.__new__(cls)
        obj.state = state
        return obj


#: The scorer the last restored cache was given, with its spec and arrays.
_last_restored: tuple[str, dict[str, mx.array], Scorer] | None = None


def _restored_scorer(spec: dict[str, Any], arrays: dict[str, mx.array]) -> Scorer:
    """The scorer for a cache being restored: the previous restored cache's
    when the spec and arrays are the same, else a new one.

    The caches a model makes share one scorer, and a scorer may rely on that
    (a NAMM whose marks pool over layers reads what the layers below took in
    this forward), so caches loaded one after another from a prompt-cache file
    share one again instead of one each.
    """
    global _last_restored
    key = json.dumps(spec, sort_keys=True)
    if _last_restored is not None:
        last_key, last_arrays, scorer = _last_restored
        if (
            last_key == key
            and last_arrays.keys() == arrays.keys()
            and all(mx.array_equal(last_arrays[k], arrays[k]).item() for k in arrays)
        ):
            return scorer
    scorer = scorer_from_spec(spec, arrays)
    _last_restored = (key, arrays, scorer)
    return scorer


def evict_now(caches: list[Any], force: bool = False) -> int:
    """Run a step on every evicting layer that holds new tokens, off-cadence.

    For one-shot policies (compressing right after the prompt) and for
    callers that want a budget enforced now. ``force`` also steps layers with
    no new tokens (a fork of a cache whose last step fell on the prompt's
    end still has its budget to apply). Returns the number of layers stepped.
    The NAMM itself needs a multiple of its hop in new tokens; layers where
    that does not hold are skipped.
    """
    stepped = 0
    for cache in caches:
        if not isinstance(cache, EvictingKVCache) or (cache.n_new == 0 and not force):
            continue
        if cache.n_new % cache.scorer.granularity:
            continue
        cache.evict()
        stepped += 1
    return stepped


# ``load_prompt_cache`` resolves cache classes by name in mlx-lm's own cache
# module; make ours findable there.
import mlx_lm.models.cache as _mlx_lm_cache  # noqa: E402

_mlx_lm_cache.EvictingKVCache = EvictingKVCache
