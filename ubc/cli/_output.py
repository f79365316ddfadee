"""What the ``ubc`` commands print: tables that fit the terminal, JSON, CSV, amounts.

Tables never cut a header or an id: a column holds either values that are never
broken (ids, numbers, addresses) or text that may fold over lines (memos, names). When
the table does not fit the terminal it is drawn without borders, and when it still does
not fit its columns are split over several tables, each repeating the first column.

``--json`` prints what the ledger answered, for scripts; amounts are printed with their
unit everywhere else: ``30 CU``, and USD (kept in cents) as ``$1.50``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = [
    "Column",
    "CsvFlag",
    "JsonFlag",
    "OutputFile",
    "amount",
    "emit_json",
    "show_table",
    "signed_amount",
    "write_csv",
]

JsonFlag = Annotated[
    bool, typer.Option("--json", help="print the ledger's answer as JSON, for scripts")
]
CsvFlag = Annotated[bool, typer.Option("--csv", help="print CSV to stdout instead of a table")]
OutputFile = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="also write the rows as CSV to this file ('-': stdout, like --csv)",
        show_default=False,
    ),
]
# Text columns that may fold still get this many cells at least.
_MIN_TEXT = 12
_DECIMALS = {"USD": 2}
_SYMBOLS = {"USD": "$"}


def amount(value: int, asset: str) -> str:
    """``30 CU``; an asset with a symbol in its major unit: ``$1.50`` (from 150 cents)."""
    return _amount(value, asset, signed=False)


def signed_amount(value: int, asset: str) -> str:
    """Like :func:`amount` with the sign always shown: ``+30 CU``, ``-$1.50``."""
    return _amount(value, asset, signed=True)


def _amount(value: int, asset: str, *, signed: bool) -> str:
    sign = "-" if value < 0 else "+" if signed else ""
    magnitude = abs(value)
    symbol = _SYMBOLS.get(asset)
    if symbol is None:
        return f"{sign}{magnitude} {asset}"
    decimals = _DECIMALS[asset]
    whole, part = divmod(magnitude, 10**decimals)
    return f"{sign}{symbol}{whole:,}.{part:0{decimals}d}"


def emit_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (nothing else is printed with ``--json``)."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_csv(
    header: Sequence[str], rows: Iterable[Sequence[object]], out: IO[str] | None = None
) -> int:
    """Rows as CSV (header first) to ``out`` (default stdout); the number of rows."""
    writer = csv.writer(out if out is not None else sys.stdout, lineterminator="\n")
    writer.writerow(header)
    count = 0
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
        count += 1
    return count


@dataclass(frozen=True)
class Column:
    """A column: ``wrap`` text may fold over lines; everything else is never broken."""

    header: str
    justify: Literal["left", "right"] = "left"
    wrap: bool = False


Row = Sequence[str]


def show_table(
    title: str | None,
    columns: Sequence[Column],
    rows: Sequence[Row | None],
    *,
    caption: str | None = None,
    bold_last: bool = False,
    show_header: bool = True,
    console: Console | None = None,
) -> None:
    """Print a table that fits the terminal (see the module's docstring).

    Cells are rich markup (escape what came from outside); ``None`` in ``rows`` draws a
    line between sections.
    """
    console = console or Console(highlight=False)
    width = console.width
    for style in ("boxed", "plain"):
        if _natural_width(columns, rows, style, show_header) <= width:
            console.print(_table(title, columns, rows, caption, bold_last, show_header, style))
            return
    # Split: the title above the parts, the caption below them.
    if title:
        console.print(f"[italic]{title}[/italic]", justify="left")
    for group in _groups(columns, rows, width):
        cols = [columns[i] for i in group]
        part_rows = [None if r is None else [r[i] for i in group] for r in rows]
        console.print(_table(None, cols, part_rows, None, bold_last, show_header, "plain"))
    if caption:
        console.print(f"[dim]{caption}[/dim]")


def _table(
    title: str | None,
    columns: Sequence[Column],
    rows: Sequence[Row | None],
    caption: str | None,
    bold_last: bool,
    show_header: bool,
    style: str,
    *,
    measure: bool = False,
) -> Table:
    plain = style == "plain"
    table = Table(
        title=title,
        caption=caption,
        show_header=show_header,
        box=box.SIMPLE_HEAD if plain else box.HEAVY_HEAD,
        show_edge=not plain,
        pad_edge=not plain,
        collapse_padding=plain,
    )
    for i, column in enumerate(columns):
        cells = [column.header] + [r[i] for r in rows if r is not None]
        longest = max(_cell_width(c) for c in cells)
        if column.wrap:
            floor = min(longest, max(_MIN_TEXT, _cell_width(column.header)))
            table.add_column(
                column.header,
                justify=column.justify,
                overflow="fold",
                min_width=floor,
                max_width=floor if measure else None,
            )
        else:
            table.add_column(column.header, justify=column.justify, no_wrap=True, min_width=longest)
    real = [r for r in rows if r is not None]
    for row in rows:
        if row is None:
            table.add_section()
            continue
        last = bold_last and row is real[-1]
        table.add_row(*row, style="bold" if last else None)
    return table


def _cell_width(markup: str) -> int:
    from rich.text import Text

    lines = Text.from_markup(markup).plain.splitlines() or [""]
    return max(cell_len(line) for line in lines)


def _natural_width(
    columns: Sequence[Column], rows: Sequence[Row | None], style: str, show_header: bool
) -> int:
    """The width a table needs with every unbreakable column whole and text columns at
    their minimum."""
    table = _table(None, columns, rows, None, False, show_header, style, measure=True)
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, highlight=False).print(table)
    return max((cell_len(line) for line in buffer.getvalue().splitlines()), default=0)


def _groups(columns: Sequence[Column], rows: Sequence[Row | None], width: int) -> list[list[int]]:
    """Column indexes per table, each starting with column 0, each fitting ``width``."""
    groups: list[list[int]] = []
    current = [0]
    for i in range(1, len(columns)):
        trial = current + [i]
        needed = _natural_width(
            [columns[j] for j in trial],
            [None if r is None else [r[j] for j in trial] for r in rows],
            "plain",
            True,
        )
        if len(current) > 1 and needed > width:
            groups.append(current)
            current = [0, i]
        else:
            current = trial
    groups.append(current)
    return groups


def key_value_rows(items: Mapping[str, str]) -> list[Row]:
    """``field, value`` rows of a two-column table (the values escaped)."""
    return [[escape(k), escape(v)] for k, v in items.items()]
