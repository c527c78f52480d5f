"""What every eviction policy shares: the scorer interface, the policy facts
and the registry.

The cache (:mod:`namm_mlx.cache`) imports this module and nothing above it:
it hands a scorer an :class:`EvictionContext` and gets :class:`Scores` back,
and rebuilds a saved scorer with :func:`scorer_from_spec`.

A policy class also states its facts as class attributes (see
:class:`Policy`); the registry, ``namm eval`` (its plan, its ``--policy``
help, its plot colours) read them from the class, so a new policy is one class
plus one :func:`register` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import mlx.core as mx

from ..attention import attention_probabilities

Color = tuple[int, int, int]


@dataclass
class EvictionContext:
    """What a scorer sees at an eviction step for one layer.

    keys: ``[B, H, N, D]`` post-RoPE keys of every slot (old kept slots first,
    then the ``n_new`` slots appended since the last step; de-quantised when
    the cache stores them quantised). positions:
    ``[B, H, N]`` absolute positions. state: the scorer's per-token arrays for
    the ``N - n_new`` old slots, as it returned them last time (empty at the
    first step). offset: tokens seen so far.
    """

    keys: mx.array
    positions: mx.array
    n_new: int
    offset: int
    state: list[mx.array]
    queries: mx.array | None = None  # [B, Hq, n, D] buffered queries, newest last
    scale: float | None = None
    #: how many of the newest buffered queries no earlier step has seen (the
    #: rest were retained across a step for a scorer's ``retain_queries``)
    new_queries: int = 0
    #: ``[B, H, n, N]`` GQA-averaged probabilities of the ``n`` newest queries,
    #: taken from the forward that completed the block (None: not available),
    #: rounded as ``probabilities_dtype`` says.
    probabilities: mx.array | None = None
    probabilities_dtype: str = "float32"
    #: the cache's layer index (None: the cache was built without one), for
    #: scorers whose weights differ by layer
    layer: int | None = None
    #: the most slots per head this step keeps, when the cache has a fixed
    #: budget (None: the scorer's threshold decides how many)
    budget: int | None = None

    def attention(self, rows: int | None = None, dtype: str = "float32") -> mx.array:
        """GQA-averaged attention ``[B, H, rows, N]`` of the newest ``rows``
        buffered queries (all of them when ``None``): the forward's own when it
        covers them, otherwise recomputed from the buffered queries."""
        taken = self.probabilities
        wanted = rows
        if wanted is None:
            wanted = self.queries.shape[2] if self.queries is not None else None if taken is None else taken.shape[2]
        if taken is not None and dtype == self.probabilities_dtype and wanted is not None and wanted <= taken.shape[2]:
            return taken[:, :, taken.shape[2] - wanted :]
        if self.queries is None:
            raise RuntimeError("this scorer did not ask the cache to buffer queries")
        return attention_probabilities(self.queries, self.keys, self.scale, rows, dtype)


@dataclass
class Scores:
    """A scorer's verdict for one layer.

    scores: ``[B, H, N]``, higher = more worth keeping (the newest slot is
    always kept regardless). state: per-token arrays ``[B, H, N, ...]`` to carry
    to the next step (gathered with the kept slots). keep: tokens per head the
    scorer wants to keep (``None``: all of them, unless a budget applies).
    """

    scores: mx.array
    state: list[mx.array] = field(default_factory=list)
    keep: int | None = None


class Scorer(Protocol):
    """A token-importance policy for :class:`~namm_mlx.cache.EvictingKVCache`.

    Attributes: ``interval`` (tokens between steps), ``granularity`` (a step
    needs a multiple of this many new tokens), ``needs_queries`` (buffer the
    queries so ``EvictionContext.attention`` works) and optionally
    ``query_rows`` (only the newest this many queries are ever needed),
    ``retain_queries`` (keep the newest this many queries across a step that
    evicted nothing, so a one-shot policy forked from this cache still sees
    the prompt's last queries), ``needs_own_state`` (its carried state cannot
    start from another policy's cache) and ``attention_dtype`` (how
    :meth:`EvictionContext.attention` will be asked to round the
    probabilities; the cache prepares them that way during the forward that
    completes a block, default ``"float32"``).
    """

    interval: int
    granularity: int
    needs_queries: bool

    def score(self, context: EvictionContext) -> Scores: ...

    def spec(self) -> dict[str, Any]:
        """JSON-able description, with ``"policy"`` naming the registered class."""
        ...

    def arrays(self) -> dict[str, mx.array]:
        """Arrays needed to rebuild the scorer (e.g. the NAMM weights)."""
        ...


class Policy:
    """The facts of a registered policy, as class attributes.

    name: the policy's name in specs, ``make_scorer`` and ``namm eval --policy``.
    help: one line for ``namm eval --help``.
    color: RGB of its line in ``namm eval``'s plot.
    takes_budget: ``namm eval`` runs it at each ``--budget`` (False: full
    cache, and the NAMM at its own threshold).
    one_shot_default: by default it compresses once, when the caller runs
    ``evict_now`` after the prompt, instead of every ``interval`` tokens.
    seed_param: the constructor argument that takes ``namm eval --seed``.
    needs_own_state: its carried state must start with its own first step,
    so it cannot continue (fork) another policy's cache.
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    color: ClassVar[Color | None] = None
    takes_budget: ClassVar[bool] = True
    one_shot_default: ClassVar[bool] = False
    seed_param: ClassVar[str | None] = None
    needs_own_state: ClassVar[bool] = False

    @classmethod
    def create(cls, namm: Any = None, **params: Any) -> Any:
        """The scorer of this policy with ``params`` (its constructor arguments)."""
        if namm is not None:
            raise TypeError(f"namm= is only used by the 'namm' policy, not {cls.name!r}")
        return cls(**params)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], arrays: dict[str, mx.array]) -> Any:
        """Rebuild a scorer from its :meth:`spec` and :meth:`arrays`."""
        return cls(**{k: v for k, v in spec.items() if k != "policy"})


#: policy name -> class, in comparison-table order (registration order).
REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Make ``cls`` (a :class:`Policy` with a ``score`` method) known by its name
    to ``make_scorer``, saved prompt caches and ``namm eval``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} has no policy name")
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a registered policy (for tests and plug-ins that clean up)."""
    REGISTRY.pop(name, None)


def policy_names() -> tuple[str, ...]:
    """Every registered policy, in comparison-table order."""
    return tuple(REGISTRY)


def policy_class(name: str) -> type:
    """The class registered as ``name``; a one-line ``ValueError`` otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(REGISTRY)}") from None


def scorer_from_spec(spec: dict[str, Any], arrays: dict[str, mx.array]) -> Any:
    """Rebuild a scorer saved in a prompt cache."""
    cls = REGISTRY.get(spec.get("policy"))
    if cls is None:
        raise ValueError(f"prompt cache uses unknown eviction policy {spec.get('policy')!r}")
    return cls.from_spec(spec, arrays)


__all__ = [
    "Color",
    "EvictionContext",
    "Policy",
    "REGISTRY",
    "Scorer",
    "Scores",
    "policy_class",
    "policy_names",
    "register",
    "scorer_from_spec",
    "unregister",
]
