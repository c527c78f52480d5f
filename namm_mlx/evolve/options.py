"""A fitness's ``--fitness-arg KEY=VALUE`` options, and the error of a fitness that cannot be used.

Below the fitness registry (:mod:`namm_mlx.evolve.fitness`) and every fitness
built on the evaluation harness, which all parse their options with these.
"""

from __future__ import annotations

import math
from typing import Mapping

from ..errors import NammError


class FitnessError(NammError, ValueError):
    """A fitness name or option that cannot be used; one line for users."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def int_option(opts: Mapping[str, str], key: str, default: int) -> int:
    """``opts[key]`` as a non-negative int (``default`` when absent)."""
    if key not in opts:
        return default
    try:
        value = int(opts[key])
    except ValueError:
        raise FitnessError(f"fitness option {key} must be an int, got {opts[key]!r}") from None
    if value < 0:
        raise FitnessError(f"fitness option {key} must be non-negative, got {value}")
    return value


def float_option(opts: Mapping[str, str], key: str, default: float, positive: bool) -> float:
    """``opts[key]`` as a finite non-negative (``positive``: > 0) float (``default`` when absent)."""
    if key not in opts:
        return default
    try:
        value = float(opts[key])
    except ValueError:
        raise FitnessError(f"fitness option {key} must be a number, got {opts[key]!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise FitnessError(f"fitness option {key} must be {'positive' if positive else 'non-negative'}, got {value}")
    return value


__all__ = ["FitnessError", "float_option", "int_option"]
