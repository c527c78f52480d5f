"""Dependency-free PNG line plots: score against kept fraction (one line per
policy) and an evolution run's fitness per generation.

Why not matplotlib: it is not a dependency of the package and an evaluation
should not need one extra install to finish. The plot is simple enough to
rasterise directly: axes with ticks, light grid lines, one coloured polyline
with square markers per policy, and a legend drawn with a built-in 5x7 bitmap
font (digits, capital letters and a few signs; lower case is drawn as upper
case). The PNG is 8-bit RGB, one zlib-compressed IDAT, filter 0 on every row.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

Color = tuple[int, int, int]

#: Policy -> RGB, also written to results.json as the legend.
POLICY_RGB: dict[str, Color] = {
    "full": (70, 70, 70),
    "namm": (214, 39, 40),
    "h2o": (31, 119, 180),
    "snapkv": (255, 127, 14),
    "tova": (44, 160, 44),
    "streaming": (148, 103, 189),
    "knorm": (140, 86, 75),
    "random": (227, 119, 194),
}
POLICY_COLORS = {k: "#%02x%02x%02x" % v for k, v in POLICY_RGB.items()}
_EXTRA = [(23, 190, 207), (188, 189, 34), (127, 127, 127)]

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)

# 5x7 glyphs, column-major: 5 columns, bit 0 = top row (the classic LCD font).
_FONT: dict[str, tuple[int, ...]] = {
    " ": (0, 0, 0, 0, 0),
    "0": (0x3E, 0x51, 0x49, 0x45, 0x3E), "1": (0x00, 0x42, 0x7F, 0x40, 0x00),
    "2": (0x42, 0x61, 0x51, 0x49, 0x46), "3": (0x21, 0x41, 0x45, 0x4B, 0x31),
    "4": (0x18, 0x14, 0x12, 0x7F, 0x10), "5": (0x27, 0x45, 0x45, 0x45, 0x39),
    "6": (0x3C, 0x4A, 0x49, 0x49, 0x30), "7": (0x01, 0x71, 0x09, 0x05, 0x03),
    "8": (0x36, 0x49, 0x49, 0x49, 0x36), "9": (0x06, 0x49, 0x49, 0x29, 0x1E),
    "A": (0x7E, 0x11, 0x11, 0x11, 0x7E), "B": (0x7F, 0x49, 0x49, 0x49, 0x36),
    "C": (0x3E, 0x41, 0x41, 0x41, 0x22), "D": (0x7F, 0x41, 0x41, 0x22, 0x1C),
    "E": (0x7F, 0x49, 0x49, 0x49, 0x41), "F": (0x7F, 0x09, 0x09, 0x09, 0x01),
    "G": (0x3E, 0x41, 0x49, 0x49, 0x7A), "H": (0x7F, 0x08, 0x08, 0x08, 0x7F),
    "I": (0x00, 0x41, 0x7F, 0x41, 0x00), "J": (0x20, 0x40, 0x41, 0x3F, 0x01),
    "K": (0x7F, 0x08, 0x14, 0x22, 0x41), "L": (0x7F, 0x40, 0x40, 0x40, 0x40),
    "M": (0x7F, 0x02, 0x0C, 0x02, 0x7F), "N": (0x7F, 0x04, 0x08, 0x10, 0x7F),
    "O": (0x3E, 0x41, 0x41, 0x41, 0x3E), "P": (0x7F, 0x09, 0x09, 0x09, 0x06),
    "Q": (0x3E, 0x41, 0x51, 0x21, 0x5E), "R": (0x7F, 0x09, 0x19, 0x29, 0x46),
    "S": (0x46, 0x49, 0x49, 0x49, 0x31), "T": (0x01, 0x01, 0x7F, 0x01, 0x01),
    "U": (0x3F, 0x40, 0x40, 0x40, 0x3F), "V": (0x1F, 0x20, 0x40, 0x20, 0x1F),
    "W": (0x3F, 0x40, 0x38, 0x40, 0x3F), "X": (0x63, 0x14, 0x08, 0x14, 0x63),
    "Y": (0x07, 0x08, 0x70, 0x08, 0x07), "Z": (0x61, 0x51, 0x49, 0x45, 0x43),
    ".": (0x00, 0x60, 0x60, 0x00, 0x00), "-": (0x08, 0x08, 0x08, 0x08, 0x08),
    ":": (0x00, 0x36, 0x36, 0x00, 0x00), "=": (0x14, 0x14, 0x14, 0x14, 0x14),
    "(": (0x00, 0x1C, 0x22, 0x41, 0x00), ")": (0x00, 0x41, 0x22, 0x1C, 0x00),
    "/": (0x20, 0x10, 0x08, 0x04, 0x02), "_": (0x40, 0x40, 0x40, 0x40, 0x40),
    "%": (0x23, 0x13, 0x08, 0x64, 0x62), "@": (0x32, 0x49, 0x79, 0x41, 0x3E),
    "+": (0x08, 0x08, 0x3E, 0x08, 0x08), ",": (0x00, 0x50, 0x30, 0x00, 0x00),
}


class Canvas:
    """An RGB raster with the few drawing operations the plot needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def get(self, x: int, y: int) -> Color:
        i = 3 * (y * self.width + x)
        return tuple(self.pixels[i : i + 3])  # type: ignore[return-value]

    def fill(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the rectangle with corners (x0, y0) and (x1, y1), inclusive."""
        for y in range(max(min(y0, y1), 0), min(max(y0, y1), self.height - 1) + 1):
            for x in range(max(min(x0, x1), 0), min(max(x0, x1), self.width - 1) + 1):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 1) -> None:
        """Bresenham line, ``width`` pixels thick."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, lo, hi = dx + dy, -(width // 2), (width - 1) // 2
        while True:
            self.fill(x0 + lo, y0 + lo, x0 + hi, y0 + hi, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 1) -> int:
        """Draw ``text`` with its top-left corner at (x, y); returns the end x."""
        for ch in text.upper():
            glyph = _FONT.get(ch, _FONT["-"] if ch not in " " else _FONT[" "])
            for col, bits in enumerate(glyph):
                for row in range(7):
                    if bits >> row & 1:
                        self.fill(x + col * scale, y + row * scale, x + (col + 1) * scale - 1, y + (row + 1) * scale - 1, color)
            x += 6 * scale
        return x

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return max(6 * scale * len(text) - scale, 0)

    def to_png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[3 * self.width * y : 3 * self.width * (y + 1)]) for y in range(self.height)
        )
        return encode_png(self.width, self.height, raw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, filtered_rows: bytes) -> bytes:
    """A PNG file from RGB rows that already carry their filter byte."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(filtered_rows, 9))
        + _chunk(b"IEND", b"")
    )


def decode_png(data: bytes) -> tuple[int, int, list[list[Color]]]:
    """``(width, height, rows of RGB)`` of a PNG written by :func:`encode_png`
    (8-bit RGB, filter 0 only; enough to check our own output)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in {kind!r} chunk")
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            if (depth, ctype) != (8, 2):
                raise ValueError("only 8-bit RGB is supported")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 3 * width + 1
    rows = []
    for y in range(len(raw) // stride):
        line = raw[y * stride : (y + 1) * stride]
        if line[0] != 0:
            raise ValueError("only filter type 0 is supported")
        rows.append([tuple(line[1 + 3 * x : 4 + 3 * x]) for x in range(width)])
    return width, len(rows), rows  # type: ignore[return-value]


def _color(policy: str, i: int) -> Color:
    return POLICY_RGB.get(policy, _EXTRA[i % len(_EXTRA)])


def _nice_max(top: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``top`` (a round axis end)."""
    if not top > 0:
        return 1.0
    base = 10.0 ** math.floor(math.log10(top))
    return next(m * base for m in (1.0, 2.0, 2.5, 5.0, 10.0) if top <= m * base * (1 + 1e-9))


def _x_ticks(x0: float, x1: float, whole: bool) -> list[float]:
    """Tick values for the x axis. On an axis of whole numbers (``whole``:
    generations) the multiples of a 1/2/5 x 10^k step of at least 1, so every
    label sits on its value; otherwise six evenly spaced ticks (0.0 ... 1.0)."""
    span = x1 - x0
    if not whole:
        return [x0 + span * i / 5 for i in range(6)]
    base = 10.0 ** max(0, math.floor(math.log10(max(span, 1.0) / 5)))
    step = next(m * base for m in (1.0, 2.0, 5.0, 10.0) if span / (m * base) <= 5 + 1e-9)
    first = math.ceil(x0 / step) * step
    return [first + step * i for i in range(int((x1 - first) / step + 1e-9) + 1)]


def render_lines(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    x_range: tuple[float, float],
    y_max: float,
    y_min: float = 0.0,
    title: str,
    x_label: str,
    y_label: str,
    colors: Mapping[str, Color] | None = None,
    width: int = 720,
    height: int = 440,
    highlight: Sequence[str] = (),
    whole_x: bool = False,
) -> Canvas:
    """Draw ``{name: [(x, y), ...]}`` as polylines with square markers over
    ``x_range`` x ``[y_min, y_max]``, with grid, ticks, a title and a legend.

    Series named in ``highlight`` are drawn last, with larger outlined markers,
    so that a baseline measured at the same point cannot hide them. ``whole_x``:
    the x values are whole numbers (ticks only at whole numbers)."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 64, width - 170, 40, height - 56
    x0, x1 = x_range
    span = (x1 - x0) or 1.0

    def px(x: float) -> int:
        return round(left + (right - left) * min(max((x - x0) / span, 0.0), 1.0))

    def py(y: float) -> int:
        return round(bottom - (bottom - top) * min(max((y - y_min) / ((y_max - y_min) or 1.0), 0.0), 1.0))

    for x_tick in _x_ticks(x0, x1, whole_x):  # grid and ticks
        gx = px(x_tick)
        canvas.line(gx, top, gx, bottom, GRID)
        canvas.line(gx, bottom, gx, bottom + 5, BLACK)
        label = f"{x_tick:.0f}" if float(x_tick).is_integer() else f"{x_tick:.1f}"
        canvas.text(gx - Canvas.text_width(label, 2) // 2, bottom + 10, label, BLACK, 2)
    for i in range(6):
        y_tick = y_min + (y_max - y_min) * i / 5
        gy = py(y_tick)
        canvas.line(left, gy, right, gy, GRID)
        canvas.line(left - 5, gy, left, gy, BLACK)
        label = f"{y_tick:.4g}"
        canvas.text(left - 10 - Canvas.text_width(label, 2), gy - 7, label, BLACK, 2)
    canvas.line(left, top, left, bottom, BLACK, 2)
    canvas.line(left, bottom, right, bottom, BLACK, 2)
    canvas.text((left + right - Canvas.text_width(title, 2)) // 2, 12, title, BLACK, 2)
    canvas.text(right - Canvas.text_width(x_label, 1), bottom + 30, x_label, BLACK, 1)
    canvas.text(8, 14, y_label, BLACK, 1)

    # Stable sort: highlighted series last, everything else in the given order.
    for i, name in sorted(enumerate(series), key=lambda entry: entry[1] in highlight):
        color = (colors or {}).get(name) or _color(name, i)
        pts = sorted((px(x), py(y)) for x, y in series[name] if math.isfinite(x) and math.isfinite(y))
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            canvas.line(xa, ya, xb, yb, color, 2)
        outlined = name in highlight
        size = 5 if outlined else 3
        for x, y in pts:
            if outlined:
                canvas.fill(x - size - 1, y - size - 1, x + size + 1, y + size + 1, BLACK)
            canvas.fill(x - size, y - size, x + size, y + size, color)
        ly = top + 4 + 22 * i  # legend: a coloured square and the name
        canvas.fill(right + 16, ly, right + 28, ly + 12, color)
        canvas.text(right + 36, ly, name[:10], BLACK, 2)
    return canvas


def render_score_vs_kept(
    series: Mapping[str, Sequence[tuple[float, float]]], width: int = 720, height: int = 440, y_max: float | None = None
) -> Canvas:
    """Draw ``{policy: [(kept_fraction, score), ...]}`` (x in [0, 1], y in [0, y_max])."""
    if y_max is None:
        top_score = max((s for pts in series.values() for _, s in pts if math.isfinite(s)), default=0.0)
        y_max = next((v for v in (10.0, 20.0, 25.0, 50.0, 100.0) if top_score <= v), 10 * math.ceil(top_score / 10))
    return render_lines(
        series, x_range=(0.0, 1.0), y_max=y_max, title="score vs kept fraction", x_label="kept", y_label="score",
        colors=POLICY_RGB, width=width, height=height, highlight=("namm",),
    )


#: Colours of the fitness-curve lines.
FITNESS_RGB: dict[str, Color] = {"best": (214, 39, 40), "mean": (31, 119, 180), "kept": (44, 160, 44)}


def plot_fitness_curve(log: Iterable[Mapping[str, Any]], path: str | Path | BinaryIO) -> bool:
    """Plot an evolution log (``log.jsonl`` records): the best and mean fitness
    of each generation's population and its mean kept fraction, against the
    generation, into a file path or a binary file object. False if the log is
    empty."""
    records = [r for r in log if "generation" in r]
    if not records:
        return False
    series = {
        "best": [(float(r["generation"]), float(r["best"])) for r in records],
        "mean": [(float(r["generation"]), float(r["mean"])) for r in records],
        "kept": [(float(r["generation"]), float(r["kept_fraction"])) for r in records if r.get("kept_fraction") is not None],
    }
    ys = [y for pts in series.values() for _, y in pts if math.isfinite(y)]
    low = min(0.0, *ys)
    y_min = -_nice_max(-low) if low < 0 else 0.0
    y_max = _nice_max(max(ys)) if max(ys) > 0 else 0.0
    first, last = float(records[0]["generation"]), float(records[-1]["generation"])
    canvas = render_lines(
        series, x_range=(min(first, last - 1), last), y_min=y_min, y_max=y_max, title="fitness per generation",
        x_label="generation", y_label="fitness", colors=FITNESS_RGB, whole_x=True,
    )
    data = canvas.to_png()
    if hasattr(path, "write"):
        path.write(data)
    else:
        Path(path).write_bytes(data)
    return True


def plot_score_vs_kept(overall: Iterable[Mapping[str, Any]], path: str | Path) -> bool:
    """Write the plot of ``summarize()["overall"]`` rows to ``path``; False if
    there is nothing to plot."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in overall:
        series.setdefault(row["policy"], []).append((float(row["kept_fraction"]), float(row["score"])))
    if not series:
        return False
    Path(path).write_bytes(render_score_vs_kept(series).to_png())
    return True
