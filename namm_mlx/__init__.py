"""namm-mlx: Neural Attention Memory Models (learned KV-cache eviction) on MLX.

``namm_mlx.load(model, namm)`` returns an mlx-lm ``(model, tokenizer)`` whose
caches evict with the NAMM; ``namm_mlx.attach(model, namm)`` does the same for
an already loaded model. The memory model itself is :class:`NAMM`.
"""

from .integration import attach, detach, load
from .cache import EvictingKVCache, UnsupportedModelError
from .config import NAMMConfig
from .errors import NammError
from .namm import NAMM, NAMMFormatError, StepResult, TokenState
from .policies.base import EvictionContext, Scorer, Scores

__all__ = [
    "NAMM",
    "NAMMConfig",
    "NAMMFormatError",
    "NammError",
    "StepResult",
    "TokenState",
    "EvictingKVCache",
    "EvictionContext",
    "Scorer",
    "Scores",
    "UnsupportedModelError",
    "attach",
    "detach",
    "load",
]
__version__ = "0.1.0"
