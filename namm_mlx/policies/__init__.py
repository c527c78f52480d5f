"""Token-importance policies (scorers) for :class:`namm_mlx.cache.EvictingKVCache`.

Each policy is a small class with a ``score(context) -> Scores`` method; the
cache owns storage, selection and bookkeeping. The registry maps a scorer's
``spec()["policy"]`` back to its class so saved prompt caches can rebuild it.
:func:`make_scorer` builds any policy by name.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import mlx.core as mx

from .baselines import (
    BASELINES,
    NEVER,
    FullScorer,
    H2OScorer,
    KNormScorer,
    RandomScorer,
    SnapKVScorer,
    StreamingScorer,
    TOVAScorer,
)
from .namm import NAMMScorer

#: policy name -> ``from_spec(spec, arrays)``
REGISTRY: dict[str, Callable[[dict[str, Any], dict[str, mx.array]], Any]] = {
    NAMMScorer.name: NAMMScorer.from_spec,
    **{cls.name: cls.from_spec for cls in BASELINES},
}

#: Every policy :func:`make_scorer` knows, in comparison-table order.
POLICY_NAMES = ("full", "namm", "streaming", "h2o", "snapkv", "tova", "knorm", "random")

_BASELINE_CLASSES = {cls.name: cls for cls in BASELINES}


def register_policy(name: str, from_spec: Callable[[dict[str, Any], dict[str, mx.array]], Any]) -> None:
    """Make a policy rebuildable from saved prompt caches."""
    REGISTRY[name] = from_spec


def scorer_from_spec(spec: dict[str, Any], arrays: dict[str, mx.array]) -> Any:
    """Rebuild a scorer saved in a prompt cache."""
    try:
        factory = REGISTRY[spec["policy"]]
    except KeyError:
        raise ValueError(f"prompt cache uses unknown eviction policy {spec.get('policy')!r}") from None
    return factory(spec, arrays)


def make_scorer(name: str, namm: Any = None, **params: Any) -> Any:
    """Build the scorer of policy ``name`` (one of :data:`POLICY_NAMES`).

    namm: for ``"namm"`` only: a :class:`~namm_mlx.namm.NAMM`, a folder holding
    one, or a ready :class:`NAMMScorer` (its cadence comes from its config; its
    only parameter is ``ranked``: keep the top tokens up to the cache's budget). params: the policy's constructor arguments, e.g.
    ``interval`` (all baselines but ``full``, default 512), ``sinks``
    (streaming, 4), ``recent_window`` (h2o, 64), ``window``/``kernel``/
    ``pooling`` (snapkv, 32/5/"max"; its ``interval`` defaults to one-shot),
    ``seed`` (random, 0). ``full`` never steps, so an ``interval`` given to it
    is ignored (handy when one loop builds every policy).
    """
    if name == "namm":
        ranked = bool(params.pop("ranked", False))
        if params:
            raise TypeError(
                f"the namm policy takes only ranked= (got {sorted(params)}); set the rest in its config"
            )
        from ..namm import NAMM

        if isinstance(namm, NAMMScorer):
            return namm if namm.ranked == ranked else NAMMScorer(namm.namm, ranked=ranked)
        if isinstance(namm, (str, os.PathLike)):
            namm = NAMM.load(namm)
        if not isinstance(namm, NAMM):
            raise TypeError(f"make_scorer('namm') needs namm= a NAMM or a NAMM folder, got {type(namm).__name__}")
        return NAMMScorer(namm, ranked=ranked)
    if namm is not None:
        raise TypeError(f"namm= is only used by the 'namm' policy, not {name!r}")
    try:
        cls = _BASELINE_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICY_NAMES)}") from None
    if cls is FullScorer:
        params.pop("interval", None)
    try:
        return cls(**params)
    except TypeError as err:
        raise TypeError(f"bad parameters for policy {name!r}: {err}") from None


__all__ = [
    "NEVER",
    "POLICY_NAMES",
    "REGISTRY",
    "FullScorer",
    "H2OScorer",
    "KNormScorer",
    "NAMMScorer",
    "RandomScorer",
    "SnapKVScorer",
    "StreamingScorer",
    "TOVAScorer",
    "make_scorer",
    "register_policy",
    "scorer_from_spec",
]
