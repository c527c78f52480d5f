"""What every baseline shares: its cadence, its parameters as dataclass
fields, rebuilding from a spec, no arrays.

A baseline only turns an :class:`~namm_mlx.policies.base.EvictionContext`
into per-token scores (higher = keep). The cache owns storage, the gather, the
budget (``max_kv_size`` / ``keep_fraction``) and the cadence, so every
baseline returns ``keep=None`` and runs at the same cadence as the NAMM by
default (``interval=512``), which makes comparisons fair: only the choice of
tokens differs. With ``interval=None`` a policy is one-shot instead: it
compresses once, when the caller runs ``evict_now`` after the prompt (how
kvpress applies its presses).

Common simplifications against the papers (each class lists its own):

* The budget is per layer and equal for every head of a layer (the cache's
  invariant), taken from ``keep_fraction`` / ``max_kv_size``.
* Policies that evict at every decoding step in the original run at the
  shared cadence here: the cache grows by up to ``interval`` tokens between
  steps.
* Attention is the GQA mean over the query heads that share a KV head
  (``EvictionContext.attention``); the originals are mostly MHA.
* "Protected" tokens (sinks, recent windows) get finite scores above every
  unprotected one, ordered by recency, rather than ``+inf``: if the budget is
  smaller than the protected set, the most relevant protected tokens win
  instead of an arbitrary tie-break.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx

from .base import Policy

#: ``interval`` of a policy that never steps on its own (full, one-shot SnapKV).
NEVER = 1 << 62

DEFAULT_INTERVAL = 512


class Baseline(Policy):
    """A baseline's shared plumbing. Subclasses are dataclasses whose fields
    are their parameters (``interval`` among them: ``None`` is one-shot).

    After construction ``interval`` is what the cache reads: tokens between
    steps, :data:`NEVER` for a one-shot policy (``one_shot`` is then True).
    """

    needs_queries = False
    granularity = 1

    def __post_init__(self) -> None:
        interval = getattr(self, "interval", DEFAULT_INTERVAL)
        self.one_shot = interval is None
        if interval is not None:
            interval = int(interval)
            if interval < 1:
                raise ValueError(f"interval must be at least 1, got {interval}")
        self.interval = NEVER if interval is None else interval

    @property
    def interval_param(self) -> int | None:
        return None if self.one_shot else self.interval

    def params(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this scorer (JSON-able)."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "interval" in params:
            params["interval"] = self.interval_param
        return params

    def spec(self) -> dict[str, Any]:
        return {"policy": self.name, **self.params()}

    def arrays(self) -> dict[str, mx.array]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def check_non_negative(name: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return int(value)


__all__ = ["DEFAULT_INTERVAL", "NEVER", "Baseline", "check_non_negative"]
