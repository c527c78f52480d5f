"""Route mlx-lm's attention through evicting caches.

Every standard mlx-lm model module imports ``scaled_dot_product_attention``
from ``mlx_lm.models.base`` and calls it after ``cache.update_and_fetch``. We
rebind that name in every loaded model module to a dispatcher: caches with an
``attend`` method (ours) compute the attention themselves and then run their
eviction step; every other cache goes to the original function untouched.
The rebinding is idempotent and is repeated whenever caches are made, because
``mlx_lm.load`` imports model modules lazily.
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx
import mlx_lm.models.base as _base

_ORIGINAL = _base.scaled_dot_product_attention


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """Drop-in for mlx-lm's function: dispatch on the cache's ``attend``."""
    attend = getattr(cache, "attend", None)
    if attend is None:
        return _ORIGINAL(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    return attend(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


def install_hook() -> int:
    """Rebind the attention function in every imported ``mlx_lm.models`` module.

    Returns how many modules were newly hooked.
    """
    hooked = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("mlx_lm.models.") or module is None:
            continue
        if getattr(module, "scaled_dot_product_attention", None) is _ORIGINAL:
            module.scaled_dot_product_attention = scaled_dot_product_attention
            hooked += 1
    return hooked
