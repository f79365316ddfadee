"""The market's background work (stub)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from ubc.envelopes.service import LedgerContext


def expire_due_offers(session: Session, ctx: LedgerContext, *, now: datetime) -> int:
    """Journal a ledger-signed ``offer.expire`` for each open offer past its expiry."""
    return 0
