"""Reads and writes of the market's tables, for the write path (rules never write)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.orm import Session

from ubc.db import table
from ubc.market.models import Fill, Offer
from ubc.market.rules import FillRecorded, OfferCreated, OfferUpdated, OfferView

offers_t = table(Offer)
fills_t = table(Fill)


def create_offer(session: Session, change: OfferCreated, now: datetime) -> None:
    view = change.offer
    session.execute(
        insert(offers_t).values(
            id=view.id,
            seller=view.seller,
            sell_asset=view.sell_asset,
            sell_amount=view.sell_amount,
            price_asset=view.price_asset,
            price_amount=view.price_amount,
            remaining_amount=view.remaining_amount,
            remaining_price=view.remaining_price,
            status=view.status,
            expires_at=view.expires_at,
            closes_seen=view.closes_seen,
            created_at=change.created_at,
        )
    )


def update_offer(session: Session, change: OfferUpdated, now: datetime) -> None:
    view = change.offer
    values: dict[str, Any] = {
        "remaining_amount": view.remaining_amount,
        "remaining_price": view.remaining_price,
        "status": view.status,
    }
    if view.status != "open":
        values.update(closed_at=now, closed_by=change.envelope_id)
    session.execute(update(offers_t).where(offers_t.c.id == view.id).values(**values))


def record_fill(session: Session, change: FillRecorded, now: datetime) -> None:
    session.execute(
        insert(fills_t).values(
            id=change.id,
            offer_id=change.offer_id,
            seller=change.seller,
            buyer=change.buyer,
            sell_asset=change.sell_asset,
            amount=change.amount,
            price_asset=change.price_asset,
            payment=change.payment,
            fee=change.fee,
            created_at=now,
        )
    )


def read_offer(session: Session, offer_id: str) -> OfferView | None:
    row = session.execute(
        select(
            offers_t.c.id,
            offers_t.c.seller,
            offers_t.c.sell_asset,
            offers_t.c.sell_amount,
            offers_t.c.price_asset,
            offers_t.c.price_amount,
            offers_t.c.remaining_amount,
            offers_t.c.remaining_price,
            offers_t.c.status,
            offers_t.c.expires_at,
            offers_t.c.closes_seen,
        ).where(offers_t.c.id == offer_id)
    ).first()
    return None if row is None else OfferView(**row._mapping)


def capped_closes(session: Session, asset: str) -> int:
    return int(
        session.execute(
            text(
                "SELECT count(*) FROM epochs WHERE asset = :asset AND status = 'closed' "
                "AND carryover_cap IS NOT NULL"
            ),
            {"asset": asset},
        ).scalar_one()
    )


def capped_close_list(session: Session, asset: str) -> list[tuple[int, int]]:
    return [
        (int(r.carryover_cap), int(r.last_posting or 0))
        for r in session.execute(
            text(
                "SELECT carryover_cap, last_posting FROM epochs WHERE asset = :asset "
                "AND status = 'closed' AND carryover_cap IS NOT NULL "
                "ORDER BY last_posting, number"
            ),
            {"asset": asset},
        )
    ]


def posted_balance_at(session: Session, address: str, asset: str, last_posting: int) -> int:
    account = session.execute(
        text("SELECT id FROM accounts WHERE address = :address AND asset = :asset"),
        {"address": address, "asset": asset},
    ).scalar_one()
    balance = session.execute(
        text(
            "SELECT balance_after FROM postings WHERE account_id = :account "
            "AND id <= :last ORDER BY id DESC LIMIT 1"
        ),
        {"account": account, "last": last_posting},
    ).scalar_one_or_none()
    return int(balance or 0)
