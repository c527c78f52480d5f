"""PNG plots with matplotlib: score against kept fraction (one line per
policy) and an evolution run's fitness per generation.

matplotlib is the optional ``[plot]`` extra: evaluation and evolution finish
without it and print one line saying how to get their plots. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot), so nothing depends on a
display or on global plotting state.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

from ..policies import POLICIES, REGISTRY
from ..policies.base import Color

#: Built-in policy -> RGB (each policy class's ``color``; see :func:`policy_rgb`).
POLICY_RGB: dict[str, Color] = {cls.name: cls.color for cls in POLICIES}
POLICY_COLORS = {k: "#%02x%02x%02x" % v for k, v in POLICY_RGB.items()}
_EXTRA = [(23, 190, 207), (188, 189, 34), (127, 127, 127)]


def policy_rgb(name: str) -> Color | None:
    """The colour a registered policy's class gives itself (None: unknown or none)."""
    cls = REGISTRY.get(name)
    return getattr(cls, "color", None)


def policy_color(name: str) -> str | None:
    """:func:`policy_rgb` as ``#rrggbb``, for results.json's legend."""
    rgb = policy_rgb(name)
    return None if rgb is None else _hex(rgb)

#: Colours of the fitness-curve lines.
FITNESS_RGB: dict[str, Color] = {"best": (214, 39, 40), "mean": (31, 119, 180), "kept": (44, 160, 44)}

#: Pixel size of every plot (inches x DPI).
SIZE, DPI = (8.0, 4.4), 100
MATPLOTLIB_HINT = "note: plots need matplotlib; install them with: pip install 'namm-mlx[plot]'"
_hinted = False


def plots_available() -> bool:
    """True if matplotlib is importable; otherwise prints the install hint once."""
    global _hinted
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not _hinted:
            print(MATPLOTLIB_HINT, file=sys.stderr)
            _hinted = True
        return False
    return True


def _hex(rgb: Color) -> str:
    return "#%02x%02x%02x" % rgb


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI)
    fig.subplots_adjust(left=0.08, right=0.7, top=0.92, bottom=0.12)  # the same frame for every plot
    return fig, fig.add_subplot()


def _legend(fig, **kwargs) -> None:
    """Right of the axes (and of a second y axis), where it cannot cover a point."""
    fig.legend(loc="upper left", bbox_to_anchor=(0.78, 0.92), frameon=False, **kwargs)


def score_vs_kept_figure(series: Mapping[str, Sequence[tuple[float, float]]]):
    """``{policy: [(kept_fraction, score), ...]}`` as lines with markers.

    The NAMM is drawn last with a larger outlined marker, so a baseline
    matched to its exact point (``--match namm``) cannot hide it."""
    fig, ax = _figure()
    for i, name in enumerate(series):
        pts = sorted((x, y) for x, y in series[name] if math.isfinite(x) and math.isfinite(y))
        if not pts:
            continue
        highlight = name == "namm"
        ax.plot(
            [x for x, _ in pts], [y for _, y in pts],
            color=_hex(policy_rgb(name) or _EXTRA[i % len(_EXTRA)]), linewidth=2, marker="s",
            markersize=11 if highlight else 7, markeredgecolor="black" if highlight else "none",
            markeredgewidth=1.2 if highlight else 0, zorder=10 if highlight else 2, label=name,
        )
    ax.set(xlim=(-0.03, 1.03), xlabel="kept fraction of the KV cache", ylabel="score", title="score vs kept fraction")
    ax.set_ylim(bottom=0.0)
    ax.grid(True, color="#e1e1e1", zorder=0)
    _legend(fig)
    return fig


def fitness_figure(records: Sequence[Mapping[str, Any]]):
    """Best and mean fitness per generation (left axis) and the population's
    mean kept fraction (right axis, 0-1), ticks on whole generations."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    gens = [float(r["generation"]) for r in records]
    lines = []
    for key, label in (("best", "best fitness"), ("mean", "mean fitness")):
        lines += ax.plot(gens, [float(r[key]) for r in records], color=_hex(FITNESS_RGB[key]), linewidth=2,
                         marker="s", markersize=7, label=label)
    kept = [(float(r["generation"]), float(r["kept_fraction"])) for r in records if r.get("kept_fraction") is not None]
    if kept:
        right = ax.twinx()
        lines += right.plot([g for g, _ in kept], [k for _, k in kept], color=_hex(FITNESS_RGB["kept"]), linewidth=2,
                            marker="s", markersize=7, label="kept fraction")
        right.set(ylim=(0.0, 1.0), ylabel="kept fraction")
    first, last = min(gens), max(gens)
    pad = 0.03 * max(last - first, 1.0)  # edge markers stay whole
    ax.set(xlim=(min(first, last - 1) - pad, last + pad), xlabel="generation", ylabel="fitness",
           title="fitness per generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="#e1e1e1", zorder=0)
    _legend(fig, handles=lines)
    return fig


def _save(fig, path: str | Path | BinaryIO) -> None:
    fig.savefig(path, format="png", dpi=DPI)


def plot_fitness_curve(log: Iterable[Mapping[str, Any]], path: str | Path | BinaryIO) -> bool:
    """Plot an evolution log (``log.jsonl`` records) into a file path or a
    binary file object. False if the log is empty or matplotlib is missing."""
    records = [r for r in log if "generation" in r]
    if not records or not plots_available():
        return False
    _save(fitness_figure(records), path)
    return True


def plot_score_vs_kept(overall: Iterable[Mapping[str, Any]], path: str | Path) -> bool:
    """Write the plot of ``summarize()["overall"]`` rows to ``path``; False if
    there is nothing to plot or matplotlib is missing."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in overall:
        series.setdefault(row["policy"], []).append((float(row["kept_fraction"]), float(row["score"])))
    if not series or not plots_available():
        return False
    _save(score_vs_kept_figure(series), path)
    return True
