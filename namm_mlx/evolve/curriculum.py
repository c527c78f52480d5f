"""A run's curriculum: named stages of generations, each with its fitness.

All stages continue the same CMA-ES run (spec §6.3/§7.3); a generation's
stage is found by counting generations through the stage table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .run_folder import DEFAULT_STAGE, EvolveError, _is_int


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: ``generations`` generations scored by ``fitness_fn``."""

    name: str
    generations: int
    fitness_fn: Callable[..., list[dict]] | None = None


def _plan(fitness_fn: Any, stages: Sequence[Any] | None, generations: int | None) -> list[Stage] | None:
    """The curriculum as Stage objects (generations of a single stage may be None = resume)."""
    if stages is not None:
        if fitness_fn is not None:
            raise EvolveError("pass either fitness_fn or stages, not both")
        plan = []
        for item in stages:
            stage = item if isinstance(item, Stage) else Stage(*item)
            if not isinstance(stage.name, str) or not stage.name:
                raise EvolveError(f"stage names must be non-empty strings, got {stage.name!r}")
            open_count = stage.generations is None and len(stages) == 1  # resume: the stored target
            if not open_count and (not _is_int(stage.generations) or stage.generations < 0):
                raise EvolveError(f"stage {stage.name!r} needs a non-negative generation count")
            if not callable(stage.fitness_fn):
                raise EvolveError(f"stage {stage.name!r} has no fitness function")
            plan.append(stage)
        if not plan:
            raise EvolveError("stages is empty")
        if len({s.name for s in plan}) != len(plan):
            raise EvolveError("stage names must be unique")
        total = sum(s.generations or 0 for s in plan)
        if generations is not None and generations != total:
            raise EvolveError(f"generations={generations} disagrees with the stages' total of {total}")
        return plan
    if not callable(fitness_fn):
        raise EvolveError("evolve() needs a fitness function (or stages)")
    if generations is not None and (not _is_int(generations) or generations < 0):
        raise EvolveError(f"generations must be a non-negative int, got {generations!r}")
    return [Stage(DEFAULT_STAGE, generations, fitness_fn)]  # type: ignore[arg-type]


def _stage_table(stages: Sequence[Mapping[str, Any] | Stage]) -> list[tuple[str, int]]:
    return [(s.name, int(s.generations)) if isinstance(s, Stage) else (s["name"], int(s["generations"])) for s in stages]


def _stage_at(table: list[tuple[str, int]], generation: int) -> tuple[int, str]:
    """(index, name) of the stage that runs ``generation`` (1-based)."""
    end = 0
    for index, (name, count) in enumerate(table):
        end += count
        if generation <= end:
            return index, name
    return len(table) - 1, table[-1][0]


def _resolve_plan(plan: list[Stage], run: Mapping[str, Any]) -> list[Stage]:
    """Fill a single stage's open generation count from the stored target."""
    if len(plan) == 1 and plan[0].generations is None:
        return [Stage(plan[0].name, int(run["generations"]), plan[0].fitness_fn)]
    return plan
