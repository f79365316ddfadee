"""Server-rendered SVG bar charts: the geometry is computed here, the SVG is written by
the ``charts.html`` macro (no script, no inline style: the strict CSP holds). Integers and
exact decimals in, coordinates out; the numbers shown are the values themselves."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

WIDTH = 480
LABEL_WIDTH = 150
VALUE_WIDTH = 90
ROW = 26
BAR = 18


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: str
    y: int
    width: int
    text_y: int


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    bars: list[Bar]
    width: int
    height: int
    label_width: int
    bar_x: int
    value_x: int


def bar_chart(title: str, items: list[tuple[str, int | Decimal | str]], unit: str = "") -> Chart:
    """Horizontal bars, one per (label, value), scaled to the largest value."""
    values = [Decimal(str(v)) for _, v in items]
    top = max(values, default=Decimal(0))
    span = WIDTH - LABEL_WIDTH - VALUE_WIDTH
    bars = []
    for i, ((label, raw), value) in enumerate(zip(items, values, strict=True)):
        width = 0 if top <= 0 else int(value * span / top)
        if value > 0 and width < 1:
            width = 1
        shown = f"{raw} {unit}".strip()
        bars.append(Bar(label, shown, i * ROW + 4, width, i * ROW + 4 + BAR // 2))
    return Chart(
        title=title,
        bars=bars,
        width=WIDTH,
        height=max(len(bars), 1) * ROW + 8,
        label_width=LABEL_WIDTH - 8,
        bar_x=LABEL_WIDTH,
        value_x=WIDTH - VALUE_WIDTH + 6,
    )
