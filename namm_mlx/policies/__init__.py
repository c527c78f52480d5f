"""Token-importance policies (scorers) for :class:`namm_mlx.cache.EvictingKVCache`.

Each policy is a small class with a ``score(context) -> Scores`` method; the
cache owns storage, selection and bookkeeping. The registry maps a scorer's
``spec()["policy"]`` back to its class so saved prompt caches can rebuild it.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

from .namm import NAMMScorer

#: policy name -> ``from_spec(spec, arrays)``
REGISTRY: dict[str, Callable[[dict[str, Any], dict[str, mx.array]], Any]] = {
    NAMMScorer.name: NAMMScorer.from_spec,
}


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


__all__ = ["NAMMScorer", "REGISTRY", "register_policy", "scorer_from_spec"]
