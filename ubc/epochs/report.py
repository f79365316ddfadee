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
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TextIO

from sqlalchemy import BigInteger, and_, case, cast, func, select, text
from sqlalchemy.orm import Session

from ubc.clock import SYSTEM_CLOCK
from ubc.db import table
from ubc.epochs import service as epochs
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
    epoch: int
    asset: str
    status: str
    cu_price_usd: str
    window_start: datetime
    window_end: datetime
    members: list[MemberUsage]
    totals: MemberUsage
    below: Decimal | None
    below_members: list[MemberUsage]

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "asset": self.asset,
            "status": self.status,
            "cu_price_usd": self.cu_price_usd,
            "from": self.window_start.isoformat(),
            "to": self.window_end.isoformat(),
            "members": [m.to_json() for m in self.members],
            "totals": self.totals.to_json(),
            "below": None if self.below is None else _plain(self.below),
            "below_members": [m.address for m in self.below_members],
        }


def utilization(
    session: Session,
    epoch: int,
    *,
    cu_price_usd: str,
    below: Decimal | None = None,
    now: datetime | None = None,
) -> Report:
    """The report of ``epoch`` (``NotFound`` for an unknown one); one aggregate query."""
    info = epochs.get_epoch(session, epoch)
    # The window in journal order (posting ids), not by clock: a transfer committed in the
    # same batch as the close still falls on the right side of it.
    window = [postings_t.c.id > info.first_posting]
    if info.last_posting is not None:
        window.append(postings_t.c.id <= info.last_posting)
    price = _Price(Decimal(cu_price_usd))
    p, t, a = postings_t, transfers_t, accounts_t
    # A sum of one side of one account fits its 64-bit counter: BIGINT, not NUMERIC.
    sums = [
        cast(
            func.coalesce(
                func.sum(case((and_(t.c.kind == kind, p.c.side == side), p.c.posted), else_=0)),
                0,
            ),
            BigInteger,
        ).label(column)
        for column, (kind, side) in FLOWS.items()
    ]
    stmt = (
        select(a.c.address, *sums)
        .select_from(p.join(t, t.c.id == p.c.transfer_id).join(a, a.c.id == p.c.account_id))
        .where(
            a.c.asset == info.asset,
            a.c.address.like("member:%"),
            *window,
        )
        .group_by(a.c.address)
    )
    # One row per member: its address, then its sums in FLOWS order (as selected above),
    # unpacked rather than read by attribute: a report may have a million rows.
    flows_of = {str(address): flows for address, *flows in session.execute(stmt)}
    returned = _returned_from_escrow(session, info.asset, info.first_posting, info.last_posting)
    sold, bought = list(FLOWS).index("sold"), list(FLOWS).index("bought")
    members = []
    sums_of_all = [0] * len(FLOWS)
    # Sorted here, not by the database: PostgreSQL's collation may not be code-point order.
    for address in sorted(flows_of):
        amounts = [int(v) for v in flows_of[address]]
        back, back_of_this_epoch = returned.get(address, (0, 0))
        amounts[bought] -= back
        amounts[sold] -= back_of_this_epoch
        members.append(_row(address, amounts, price))
        sums_of_all = [x + y for x, y in zip(sums_of_all, amounts, strict=True)]
    totals = _row("total", sums_of_all, price)
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
    )


def _returned_from_escrow(
    session: Session, asset: str, first: int, last: int | None
) -> dict[str, tuple[int, int]]:
    """What cancelled and expired offers gave back to their sellers in the window: in all,
    and of offers also put on the market in the window.

    Offering moves units to escrow as a trade and the return is a trade too, but sold and
    bought count only what changed hands: a return is never a purchase, and it takes back
    the sale of an offer made in the same epoch (an offer made in an earlier epoch was
    counted as sold there). The return is leg 0 of the envelope that closed the offer
    (``offers.closed_by``); the offer's own leg 0 moved the units to escrow.
    """
    upper = "" if last is None else "AND p.id <= :last "
    rows = session.execute(
        text(
            "SELECT o.seller, sum(p.posted), "
            "sum(CASE WHEN c.id > :first THEN p.posted ELSE 0 END) FROM offers o "
            "JOIN transfers t ON t.id = o.closed_by || :leg0 "
            "JOIN postings p ON p.transfer_id = t.id AND p.side = 'C' "
            "JOIN accounts a ON a.id = p.account_id "
            "LEFT JOIN postings c ON c.transfer_id = o.id || :leg0 AND c.side = 'D' "
            "WHERE o.status IN ('cancelled', 'expired') AND t.kind = 'trade' "
            "AND o.sell_asset = :asset AND a.address = o.seller AND a.asset = :asset "
            f"AND p.id > :first {upper}"
            "GROUP BY o.seller"
        ),
        {"asset": asset, "first": first, "last": last, "leg0": ":0"},
    )
    return {str(seller): (int(total), int(same)) for seller, total, same in rows}


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
        writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
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
