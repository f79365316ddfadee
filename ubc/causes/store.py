"""Reads and writes of the causes' tables, for the write path (rules never write)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from ubc.causes.models import Cause, CauseSteward
from ubc.causes.rules import CAUSE_PREFIX, CauseStored, cause_address
from ubc.db import table
from ubc.ledger import service as ledger

causes_t = table(Cause)
stewards_t = table(CauseSteward)


def store_cause(session: Session, change: CauseStored, now: datetime) -> None:
    if change.created:
        session.execute(
            insert(causes_t).values(
                slug=change.slug,
                name=change.name,
                description=change.description,
                envelope_id=change.envelope_id,
                created_at=now,
                updated_at=now,
            )
        )
    else:
        session.execute(
            update(causes_t)
            .where(causes_t.c.slug == change.slug)
            .values(
                name=change.name,
                description=change.description,
                envelope_id=change.envelope_id,
                updated_at=now,
            )
        )
        session.execute(delete(stewards_t).where(stewards_t.c.slug == change.slug))
    session.execute(
        insert(stewards_t), [{"slug": change.slug, "handle": h} for h in change.stewards]
    )
    if change.created:
        address = cause_address(change.slug)
        ledger.open_accounts(session, [(address, asset) for asset in change.assets], now=now)


def cause_exists(session: Session, slug: str) -> bool:
    row = session.execute(select(causes_t.c.slug).where(causes_t.c.slug == slug)).first()
    return row is not None


def stewards(session: Session, account: str) -> frozenset[str] | None:
    """The stewards of the cause account ``account``; None if no such cause."""
    slug = account.removeprefix(CAUSE_PREFIX)
    if not cause_exists(session, slug):
        return None
    return frozenset(
        str(r.handle)
        for r in session.execute(select(stewards_t.c.handle).where(stewards_t.c.slug == slug))
    )
