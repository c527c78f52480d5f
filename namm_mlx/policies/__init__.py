"""Token-importance policies (scorers) for :class:`namm_mlx.cache.EvictingKVCache`.

Each policy is one small class in its own module with a
``score(context) -> Scores`` method; the cache owns storage, selection and
bookkeeping. :func:`make_scorer` builds any registered policy by name, and
:func:`scorer_from_spec` rebuilds one saved in a prompt cache.

Adding a policy (nothing else needs an edit):

1. Write ``policies/<name>.py``: a ``@dataclass(eq=False, repr=False)``
   subclass of :class:`~namm_mlx.policies._baseline.Baseline` (or of
   :class:`~namm_mlx.policies.base.Policy` when it carries arrays, like the
   NAMM) whose fields are its parameters (``interval: int | None = 512`` among
   them) and whose ``score(context)`` returns
   :class:`~namm_mlx.policies.base.Scores` for the
   :class:`~namm_mlx.policies.base.EvictionContext`. Give it its facts as
   class attributes: ``name``, ``help`` (one line), ``color`` (RGB for plots),
   and where the defaults do not fit ``takes_budget``, ``one_shot_default``,
   ``seed_param``, ``needs_queries``, ``needs_own_state``.
2. Add the class to :data:`POLICIES` below (or call :func:`register` on it).

``make_scorer``, saved prompt caches, ``namm eval --policy`` (its plan, its
help, its seed), and the plot then know it.
"""

from __future__ import annotations

from typing import Any

from ._baseline import NEVER
from .base import (
    REGISTRY,
    EvictionContext,
    Policy,
    Scorer,
    Scores,
    policy_class,
    policy_names,
    register,
    scorer_from_spec,
    unregister,
)
from .full import FullScorer
from .h2o import H2OScorer
from .knorm import KNormScorer
from .namm import NAMMScorer
from .random import RandomScorer
from .snapkv import SnapKVScorer
from .streaming import StreamingScorer
from .tova import TOVAScorer

#: The built-in policies, in comparison-table order.
POLICIES = (FullScorer, NAMMScorer, StreamingScorer, H2OScorer, SnapKVScorer, TOVAScorer, KNormScorer, RandomScorer)
for _cls in POLICIES:
    register(_cls)

#: The built-in policies' names (:func:`policy_names` also lists registered ones).
POLICY_NAMES = tuple(cls.name for cls in POLICIES)


def make_scorer(name: str, namm: Any = None, **params: Any) -> Any:
    """Build the scorer of policy ``name`` (one of :func:`policy_names`).

    namm: for ``"namm"`` only: a :class:`~namm_mlx.namm.NAMM`, a folder holding
    one, or a ready :class:`NAMMScorer` (its only parameter is ``ranked``).
    params: the policy's constructor arguments (its dataclass fields), e.g.
    ``interval`` (all baselines but ``full``, default 512; ``None``: one-shot),
    ``sinks`` (streaming, 4), ``recent_window`` (h2o, 64),
    ``window``/``kernel``/``pooling`` (snapkv, 32/5/"max"; its ``interval``
    defaults to one-shot), ``seed`` (random, 0). ``full`` never steps, so an
    ``interval`` given to it is ignored (handy when one loop builds every policy).
    """
    try:
        return policy_class(name).create(namm, **params)
    except TypeError as err:
        raise TypeError(f"bad parameters for policy {name!r}: {err}") from None


__all__ = [
    "NEVER",
    "POLICIES",
    "POLICY_NAMES",
    "REGISTRY",
    "EvictionContext",
    "FullScorer",
    "H2OScorer",
    "KNormScorer",
    "NAMMScorer",
    "Policy",
    "RandomScorer",
    "Scorer",
    "Scores",
    "SnapKVScorer",
    "StreamingScorer",
    "TOVAScorer",
    "make_scorer",
    "policy_class",
    "policy_names",
    "register",
    "scorer_from_spec",
    "unregister",
]
