"""Hypothesis over offers, partial fills, cancels, expiries and epoch closes.

After every step: double entry per asset, nobody below zero, escrow equals the open
offers' remainders, no value created or lost by rounding (what a buyer pays is what the
seller and the fees get; an offer never collects more than its price, and a filled one
collects exactly its price); at the end the auditor replays the journal without a finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_data_dir
from tests.test_market import Book, empty, module_database
from ubc.db import unit_of_work
from ubc.dbtypes import utcnow
from ubc.envelopes import service as envelopes
from ubc.market import service as market

module_db = module_database("market_props")
MEMBERS = ("ann", "ben", "cat")


@dataclass
class World:
    book: Book
    now: datetime
    offers: list[str] = field(default_factory=list)
    epoch: int = 0

    def submit(self, item: dict[str, Any]) -> envelopes.Outcome:
        [outcome] = self.book.submit(item, now=self.now)
        return outcome


def _step(world: World, step: tuple[Any, ...]) -> None:
    book, kind = world.book, step[0]
    if kind == "offer":
        _, seller, amount, price, sell_usd, expires = step
        item = book.envelope(
            "offer.create",
            MEMBERS[seller],
            created_at=world.now,
            sell_asset="USD" if sell_usd else "CU",
            sell_amount=amount,
            price_asset="CU" if sell_usd else "USD",
            price_amount=price,
            **(
                {}
                if expires is None
                else {"expires_at": _ts(world.now + timedelta(seconds=expires))}
            ),
        )
        outcome = world.submit(item)
        if isinstance(outcome, envelopes.Accepted):
            world.offers.append(outcome.receipt.id)
    elif kind == "fill" and world.offers:
        _, buyer, which, amount = step
        offer_id = world.offers[which % len(world.offers)]
        before = book.balances()
        outcome = world.submit(
            book.envelope(
                "offer.fill", MEMBERS[buyer], created_at=world.now, offer_id=offer_id, amount=amount
            )
        )
        if isinstance(outcome, envelopes.Accepted):
            _check_fill(book, before, outcome.receipt)
        else:
            assert book.balances() == before
    elif kind == "cancel" and world.offers:
        _, who, which = step
        offer_id = world.offers[which % len(world.offers)]
        world.submit(
            book.envelope("offer.cancel", MEMBERS[who], created_at=world.now, offer_id=offer_id)
        )
    elif kind == "wait":
        world.now += timedelta(seconds=step[1])
        with unit_of_work(book.sessions) as session:
            market.expire_due_offers(session, book.ctx, submit=envelopes.submit, now=world.now)
    elif kind == "epoch":
        world.epoch += 1
        for item in (
            book.envelope(
                "epoch.open",
                "operator",
                created_at=world.now,
                epoch=world.epoch,
                asset="CU",
                allocations={"basic": step[1]},
                carryover_cap=step[2],
                starts_at="2026-01-01T00:00:00Z",
                ends_at="2027-01-01T00:00:00Z",
            ),
            book.envelope("epoch.close", "operator", created_at=world.now, epoch=world.epoch),
        ):
            assert isinstance(world.submit(item), envelopes.Accepted)
    book.check_invariants()
    _check_offers(book)


def _ts(moment: datetime) -> str:
    from ubc.envelopes.payloads import format_timestamp

    return format_timestamp(moment)


def _check_fill(book: Book, before: dict[tuple[str, str], int], receipt: envelopes.Receipt) -> None:
    """What the buyer paid is exactly what the seller and the fees received."""
    after = book.balances()
    change = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    for asset in {k[1] for k in change}:
        assert sum(v for k, v in change.items() if k[1] == asset) == 0
    legs = receipt.effects
    assert legs[-1]["debit"] == "market:escrow"


def _check_offers(book: Book) -> None:
    rows = book.query(
        "SELECT o.id, o.status, o.price_amount, o.remaining_price, o.sell_amount, "
        "o.remaining_amount, coalesce(sum(f.payment), 0), coalesce(sum(f.amount), 0) "
        "FROM offers o LEFT JOIN offer_fills f ON f.offer_id = o.id "
        "GROUP BY o.id, o.status, o.price_amount, o.remaining_price, o.sell_amount, "
        "o.remaining_amount"
    )
    for _, status, price, left_price, amount, left, paid, filled in rows:
        assert paid + left_price == price  # nothing made or lost by rounding
        assert filled + left == amount
        assert 0 <= paid <= price
        if status == "filled":
            assert paid == price
            assert left == 0


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("offer"),
            st.integers(0, 2),
            st.integers(1, 60),
            st.integers(1, 400),
            st.booleans(),
            st.one_of(st.none(), st.integers(1, 30)),
        ),
        st.tuples(st.just("fill"), st.integers(0, 2), st.integers(0, 20), st.integers(1, 70)),
        st.tuples(st.just("cancel"), st.integers(0, 2), st.integers(0, 20)),
        st.tuples(st.just("wait"), st.integers(1, 40)),
        st.tuples(st.just("epoch"), st.integers(1, 100), st.one_of(st.none(), st.integers(0, 80))),
    ),
    min_size=1,
    max_size=20,
)


@pytest.fixture
def fresh(module_db: str, tmp_path: Path) -> tuple[str, Path]:
    return module_db, make_data_dir(tmp_path / "data")


@settings(max_examples=8)
@given(steps=steps, fee=st.integers(0, 500))
def test_the_market_keeps_every_invariant(
    fresh: tuple[str, Path], steps: list[tuple[Any, ...]], fee: int
) -> None:
    url, data_dir = fresh
    empty(url)
    book = Book(url, data_dir, market_fee_bps=fee)
    try:
        for handle in MEMBERS:
            book.member(handle, cu=150, usd=1500)
        world = World(book, utcnow())
        for step in steps:
            _step(world, step)
        assert book.audit().findings == []
    finally:
        book.close()
