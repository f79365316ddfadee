"""The utilization report: what each member did with an epoch's compute.

One ``GROUP BY`` over postings ⋈ transfers ⋈ accounts sums, per member account of the
epoch's asset, the postings made in the epoch's window, in journal order: after the posting
marked when ``epoch.open`` was journaled, up to the one marked at ``epoch.close`` (none
while it is open), by kind and side:

=========  ==========  ====
column     kind        side
=========  ==========  ====
allocated  allocation  C
used       usage       D
sent       transfer    D
received   transfer    C
donated    donation    D
sold       trade       D
bought     trade       C
expired    expiry      D
=========  ==========  ====

Only the ``posted`` part of a posting counts: a hold still pending, or voided, moved
nothing. A member appears when it has at least one posting in the window, so members
who were allocated nothing but were active appear too, with allocated 0.

``utilization`` is ``used / allocated`` as a percent with two decimals, rounded half up
from the exact integer ratio (``None`` when nothing was allocated). ``below`` compares the
exact ratio, not the rounded one. Values in USD are the exact products of the CU price
(per smallest unit of the asset) and the amounts. No float anywhere.

Members are listed in code point order of their addresses (the database's binary
collation, on both engines), a page at a time: :func:`utilization` answers at most
``limit`` members after a cursor (the last address of the previous page), each row
computed by the database for that page's accounts only, and on the first page the totals
of the whole epoch as one aggregate over the same rows. :func:`csv_chunks` streams every
row through a server-side cursor. Neither holds more than a page (or a chunk) of members.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    bindparam,
    func,
    select,
    text,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.selectable import TextualSelect

from ubc.clock import SYSTEM_CLOCK
from ubc.db import table
from ubc.epochs import service as epochs
from ubc.epochs.service import EpochInfo
from ubc.errors import BadRequest
from ubc.ledger import service as ledger
from ubc.ledger.bulk import binary_order
from ubc.ledger.models import Account, Posting, Transfer

accounts_t = table(Account)
transfers_t = table(Transfer)
postings_t = table(Posting)

#: Report column → (transfer kind, posting side) it sums.
FLOWS: dict[str, tuple[str, str]] = {
    "allocated": ("allocation", "C"),
    "used": ("usage", "D"),
    "sent": ("transfer", "D"),
    "received": ("transfer", "C"),
    "donated": ("donation", "D"),
    "sold": ("trade", "D"),
    "bought": ("trade", "C"),
    "expired": ("expiry", "D"),
}

#: A ``below`` threshold as text: a percent of up to 7 digits and 6 decimals.
PERCENT_PATTERN = r"^[0-9]{1,7}(\.[0-9]{1,6})?$"

#: The columns of a row, in order (also the CSV header).
COLUMNS: tuple[str, ...] = (
    "address",
    *FLOWS,
    "utilization",
    "allocated_usd",
    "used_usd",
)


@dataclass(frozen=True, slots=True)
class MemberUsage:
    """One member's row (or the totals, with address ``total``)."""

    address: str
    allocated: int
    used: int
    sent: int
    received: int
    donated: int
    sold: int
    bought: int
    expired: int
    utilization: str | None
    allocated_usd: str
    used_usd: str

    def to_json(self) -> dict[str, Any]:
        return {column: getattr(self, column) for column in COLUMNS}


@dataclass(frozen=True, slots=True)
class Report:
    """One page of the report: ``members`` in address order, ``next_cursor`` the last
    address of the page when more follow; ``totals`` of the whole epoch (first page only)."""

    epoch: int
    asset: str
    status: str
    cu_price_usd: str
    window_start: datetime
    window_end: datetime
    members: list[MemberUsage]
    totals: MemberUsage | None
    below: Decimal | None
    below_members: list[MemberUsage]
    next_cursor: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "asset": self.asset,
            "status": self.status,
            "cu_price_usd": self.cu_price_usd,
            "from": self.window_start.isoformat(),
            "to": self.window_end.isoformat(),
            "members": [m.to_json() for m in self.members],
            "totals": None if self.totals is None else self.totals.to_json(),
            "below": None if self.below is None else _plain(self.below),
            "below_members": [m.address for m in self.below_members],
            "next_cursor": self.next_cursor,
        }


#: Members per page: by default, and at most.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
#: Rows fetched from the database at a time while the CSV streams.
CSV_CHUNK = 1000

#: A cursor is the last address of the previous page; anything else is refused (400).
_CURSOR = re.compile(r"member:[a-z0-9_-]{1,64}")


def parse_cursor(value: str | None) -> str | None:
    """The address a report cursor names (None for the first page); 400 unless it looks
    like a member's address, as every cursor this server makes does."""
    if value is None or value == "":
        return None
    if _CURSOR.fullmatch(value) is None:
        raise BadRequest("invalid cursor", detail={"cursor": value})
    return value


def utilization(
    session: Session,
    epoch: int,
    *,
    cu_price_usd: str,
    below: Decimal | None = None,
    now: datetime | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Report:
    """One page of the report of ``epoch`` (``NotFound`` for an unknown one): at most
    ``limit`` members after the address ``cursor`` (from the first without one), in code
    point order. Three bounded queries: the page's accounts, their rows, and, on the first
    page, the totals of the whole epoch (an aggregate: nothing per member is held)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1 to {MAX_LIMIT}, not {limit}")
    info = epochs.get_epoch(session, epoch)
    price = _Price(Decimal(cu_price_usd))
    page = _page(session, info, cursor, limit)
    members: list[MemberUsage] = []
    next_cursor = None
    if page:
        more = len(page) > limit
        ids = [account_id for account_id, _ in page[:limit]]
        last = page[:limit][-1][1]
        stmt = _rows(session, info, ids=ids, after=cursor, upto=last)
        members = [
            _row(str(address), [int(v) for v in flows], price)
            for address, *flows in session.execute(stmt)
        ]
        next_cursor = last if more else None
    totals = None
    if cursor is None:
        grand = _rows(session, info).order_by(None).subquery("m")
        sums = session.execute(select(*(func.sum(grand.c[f]) for f in FLOWS))).one()
        totals = _row("total", [0 if v is None else int(v) for v in sums], price)
    under = []
    if below is not None:
        units, digits = _scaled(below)
        scale = 100 * int(10**digits)
        under = [m for m in members if m.allocated > 0 and m.used * scale < units * m.allocated]
    return Report(
        epoch=info.number,
        asset=info.asset,
        status=info.status,
        cu_price_usd=cu_price_usd,
        window_start=info.opened_at,
        window_end=info.closed_at or now or SYSTEM_CLOCK.now(),
        members=members,
        totals=totals,
        below=below,
        below_members=under,
        next_cursor=next_cursor,
    )


def csv_chunks(
    session: Session, info: EpochInfo, *, cu_price_usd: str, chunk: int | None = None
) -> Generator[str, None, None]:
    """The whole report of an epoch as CSV text, piece by piece: the header, every member's
    row in code point order, then the ``total`` row (the sum of the rows above it).

    One query read through a server-side cursor ``chunk`` rows at a time (``yield_per``;
    :data:`CSV_CHUNK` by default), so memory stays flat however many members there are;
    ``session`` must stay open until the iterator is exhausted or closed."""
    price = _Price(Decimal(cu_price_usd))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    sums = [0] * len(FLOWS)
    rows_at_a_time = chunk or CSV_CHUNK
    result = session.execute(_rows(session, info).execution_options(yield_per=rows_at_a_time))
    try:
        for rows in result.partitions():
            for address, *flows in rows:
                amounts = [int(v) for v in flows]
                sums = [x + y for x, y in zip(sums, amounts, strict=True)]
                writer.writerow(_cells(_row(str(address), amounts, price).to_json()))
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    finally:
        result.close()
    writer.writerow(_cells(_row("total", sums, price).to_json()))
    yield out.getvalue()


def _page(
    session: Session, info: EpochInfo, cursor: str | None, limit: int
) -> list[tuple[int, str]]:
    """The ids and addresses of up to ``limit + 1`` member accounts after ``cursor`` with a
    posting in the window, in code point order (one more tells whether a page follows)."""
    a, p = accounts_t, postings_t
    address = _binary(session, a.c.address)
    active = select(p.c.id).where(p.c.account_id == a.c.id, *_window(info)).exists()
    stmt = select(a.c.id, a.c.address).where(
        a.c.asset == info.asset, a.c.address.like("member:%"), active
    )
    if cursor is not None:
        stmt = stmt.where(address > cursor)
    stmt = stmt.order_by(address).limit(limit + 1)
    return [(int(account_id), str(addr)) for account_id, addr in session.execute(stmt)]


def _rows(
    session: Session,
    info: EpochInfo,
    *,
    ids: list[int] | None = None,
    after: str | None = None,
    upto: str | None = None,
) -> Select[Any]:
    """The report's rows, ``(address, *FLOWS)``, in code point order: every member's, or
    those of the accounts ``ids`` (whose addresses are after ``after``, up to ``upto``).

    One ``GROUP BY`` sums each member's postings of the window; the returns from escrow
    (:func:`_returned_from_escrow`) are joined to it by address and taken off ``bought``
    and ``sold``, so a row is final as it leaves the database."""
    p, t, a = postings_t, transfers_t, accounts_t
    sums = ledger.flow_sums(FLOWS)
    grouped = (
        select(a.c.address.label("address"), *sums)
        .select_from(p.join(t, t.c.id == p.c.transfer_id).join(a, a.c.id == p.c.account_id))
        .where(a.c.asset == info.asset, a.c.address.like("member:%"), *_window(info))
        .group_by(a.c.address)
    )
    if ids is not None:
        grouped = grouped.where(a.c.id.in_(ids))
    g = grouped.subquery("g")
    r = _returned_from_escrow(session, info, after=after, upto=upto).subquery("r")
    flows = [
        (g.c[column] - func.coalesce(r.c.back, 0)).label(column)
        if column == "bought"
        else (g.c[column] - func.coalesce(r.c.same, 0)).label(column)
        if column == "sold"
        else g.c[column]
        for column in FLOWS
    ]
    return (
        select(g.c.address, *flows)
        .select_from(g.outerjoin(r, r.c.seller == g.c.address))
        .order_by(_binary(session, g.c.address))
    )


def _returned_from_escrow(
    session: Session, info: EpochInfo, *, after: str | None = None, upto: str | None = None
) -> TextualSelect:
    """What cancelled and expired offers gave back to their member sellers in the window,
    per seller: in all (``back``), and of offers also put on the market in the window
    (``same``); only the sellers after ``after`` up to ``upto`` when given.

    Offering moves units to escrow as a trade and the return is a trade too, but sold and
    bought count only what changed hands: a return is never a purchase, and it takes back
    the sale of an offer made in the same epoch (an offer made in an earlier epoch was
    counted as sold there). The return is leg 0 of the envelope that closed the offer
    (``offers.closed_by``); the offer's own leg 0 moved the units to escrow.
    """
    collate = binary_order(session)
    # Typed: an untyped integer would be cast to a 32-bit INTEGER on PostgreSQL.
    params: list[BindParameter[Any]] = [
        bindparam("asset", info.asset, type_=String),
        bindparam("first", info.first_posting, type_=BigInteger),
        bindparam("leg0", ":0", type_=String),
    ]
    bounds = ""
    if info.last_posting is not None:
        bounds += "AND p.id <= :last "
        params.append(bindparam("last", info.last_posting, type_=BigInteger))
    if after is not None:
        bounds += f"AND o.seller{collate} > :after "
        params.append(bindparam("after", after, type_=String))
    if upto is not None:
        bounds += f"AND o.seller{collate} <= :upto "
        params.append(bindparam("upto", upto, type_=String))
    return (
        text(
            "SELECT o.seller AS seller, sum(p.posted) AS back, "
            "sum(CASE WHEN c.id > :first THEN p.posted ELSE 0 END) AS same FROM offers o "
            "JOIN transfers t ON t.id = o.closed_by || :leg0 "
            "JOIN postings p ON p.transfer_id = t.id AND p.side = 'C' "
            "JOIN accounts a ON a.id = p.account_id "
            "LEFT JOIN postings c ON c.transfer_id = o.id || :leg0 AND c.side = 'D' "
            "WHERE o.status IN ('cancelled', 'expired') AND t.kind = 'trade' "
            "AND o.sell_asset = :asset AND a.address = o.seller AND a.asset = :asset "
            f"AND a.address LIKE 'member:%' AND p.id > :first {bounds}"
            "GROUP BY o.seller"
        )
        .bindparams(*params)
        .columns(seller=String, back=BigInteger, same=BigInteger)
    )


def _window(info: EpochInfo) -> list[ColumnElement[bool]]:
    """The epoch's window in journal order (posting ids), not by clock: a transfer
    committed in the same batch as the close still falls on the right side of it."""
    window = [postings_t.c.id > info.first_posting]
    if info.last_posting is not None:
        window.append(postings_t.c.id <= info.last_posting)
    return window


def _binary(session: Session, column: ColumnElement[str]) -> ColumnElement[str]:
    """``column`` compared and ordered by code point on both engines (as
    :func:`ubc.ledger.bulk.binary_order` does for SQL text)."""
    return column.collate("C") if binary_order(session) else column


def _cells(row: Mapping[str, Any]) -> list[Any]:
    return ["" if row[c] is None else row[c] for c in COLUMNS]


def percent(used: int, allocated: int) -> str | None:
    """``used / allocated`` in percent with two decimals, rounded half up, by integers."""
    if allocated <= 0:
        return None
    hundredths, rest = divmod(used * 10_000, allocated)
    if 2 * rest >= allocated:
        hundredths += 1
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def usd(price: Decimal, amount: int) -> str:
    """The exact value of ``amount`` at ``price`` per unit, as a plain decimal string
    with the price's decimals (``0.001`` × 100 → ``0.100``)."""
    return _Price(price).times(amount)


def write_csv(rows: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    """Write report rows (``MemberUsage.to_json()`` or the HTTP answer's ``members``) as
    CSV with a header of :data:`COLUMNS`; an unknown utilization is an empty cell. The
    number of rows written."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(_cells(row))
        count += 1
    return count


class _Price:
    """A non-negative decimal price as an integer of its smallest decimal: exact and fast."""

    __slots__ = ("digits", "units")

    def __init__(self, price: Decimal) -> None:
        self.units, self.digits = _scaled(price)

    def times(self, amount: int) -> str:
        value = self.units * amount
        if not self.digits:
            return str(value)
        whole, fraction = divmod(value, int(10**self.digits))
        return f"{whole}.{fraction:0{self.digits}d}"


def _row(address: str, amounts: list[int], price: _Price) -> MemberUsage:
    flows = dict(zip(FLOWS, amounts, strict=True))
    return MemberUsage(
        address=address,
        allocated=flows["allocated"],
        used=flows["used"],
        sent=flows["sent"],
        received=flows["received"],
        donated=flows["donated"],
        sold=flows["sold"],
        bought=flows["bought"],
        expired=flows["expired"],
        utilization=percent(flows["used"], flows["allocated"]),
        allocated_usd=price.times(flows["allocated"]),
        used_usd=price.times(flows["used"]),
    )


_MAX_EXPONENT = 40


def _scaled(value: Decimal) -> tuple[int, int]:
    """``value`` as ``(units, digits)`` with ``value == units / 10**digits``, exactly."""
    if not value.is_finite() or value < 0:
        raise ValueError(f"expected a finite decimal of 0 or more, not {value}")
    _sign, numerals, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    if not -_MAX_EXPONENT <= exponent <= _MAX_EXPONENT:
        raise ValueError(f"{value} has too many digits")
    mantissa = int("".join(map(str, numerals)) or "0")
    if exponent >= 0:
        return mantissa * int(10**exponent), 0
    return mantissa, -exponent


def _plain(value: Decimal) -> str:
    return format(value, "f")
