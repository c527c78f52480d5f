"""namm-mlx: Neural Attention Memory Models (learned KV-cache eviction) on MLX."""

from .config import NAMMConfig
from .namm import NAMM, NAMMFormatError, StepResult, TokenState

__all__ = ["NAMM", "NAMMConfig", "NAMMFormatError", "StepResult", "TokenState"]
__version__ = "0.1.0"
