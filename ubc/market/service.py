"""The market's background work and reads: offer expiry, the order book, trades, and
withdrawals that wait for the operator's countersignature."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, or_, select
from sqlalchemy.orm import Session

from ubc.db import table
from ubc.errors import (
    BadRequest,
    Forbidden,
    IdempotencyConflict,
    InvalidPayload,
    NotFound,
    UbcError,
)
from ubc.journal.models import JournalEntry
from ubc.ledger.models import Request
from ubc.ledger.payloads import Withdrawal
from ubc.market.models import Fill, Offer, WithdrawalRequest
from ubc.market.payloads import OfferExpire
from ubc.members.models import ExternalRef, MemberKey
from ubc.params import parse_cursor
from ubc.rules.payload import check_text, format_timestamp
from ubc.rules.writing import (
    Accepted,
    LedgerContext,
    Precheck,
    Submit,
    ledger_payload,
    sign_internal,
)

offers_t = table(Offer)
fills_t = table(Fill)
withdrawals_t = table(WithdrawalRequest)
requests_t = table(Request)
entries_t = table(JournalEntry)
keys_t = table(MemberKey)
refs_t = table(ExternalRef)

#: Offers expired per round of the sweeper (each round is one transaction).
EXPIRE_BATCH = 500
MAX_LIST = 1000


# --- expiry -------------------------------------------------------------------------------


def expire_due_offers(
    session: Session, ctx: LedgerContext, *, now: datetime, submit: Submit
) -> int:
    """Journal a ledger-signed ``offer.expire`` for each open offer past its expiry,
    through the write path's ``submit`` (``ubc.envelopes.service.submit``).

    Runs in the server's sweeper, in its own unit of work; returns how many expired. An
    offer filled or cancelled meanwhile (another process) simply fails its expiry.
    """
    if ctx.ledger_key is None:
        return 0
    due = [
        str(r.id)
        for r in session.execute(
            select(offers_t.c.id)
            .where(offers_t.c.status == "open", offers_t.c.expires_at <= now)
            .order_by(offers_t.c.expires_at, offers_t.c.id)
            .limit(EXPIRE_BATCH)
        )
    ]
    if not due:
        return 0
    items = [
        sign_internal(ctx, ledger_payload(ctx, OfferExpire, now, offer_id=offer_id), "offer.expire")
        for offer_id in due
    ]
    outcomes = submit(session, ctx, items, now=now)
    return sum(1 for o in outcomes if isinstance(o, Accepted) and not o.repeated)


# --- reads --------------------------------------------------------------------------------

_OFFER_COLUMNS = (
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
    offers_t.c.created_at,
    offers_t.c.closed_at,
    offers_t.c.closed_by,
)


@dataclass(frozen=True, slots=True)
class OfferRow:
    id: str
    seller: str
    sell_asset: str
    sell_amount: int
    price_asset: str
    price_amount: int
    remaining_amount: int
    remaining_price: int
    status: str
    expires_at: datetime | None
    created_at: datetime
    closed_at: datetime | None
    closed_by: str | None

    def shown_status(self, now: datetime) -> str:
        """``expired`` as soon as the time has passed, before the sweeper journals it."""
        if self.status == "open" and self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return self.status

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "seller": self.seller,
            "sell_asset": self.sell_asset,
            "sell_amount": self.sell_amount,
            "price_asset": self.price_asset,
            "price_amount": self.price_amount,
            "remaining_amount": self.remaining_amount,
            "remaining_price": self.remaining_price,
            "sold": self.sell_amount - self.remaining_amount,
            "status": self.shown_status(now),
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
            "created_at": self.created_at.isoformat(),
            "closed_at": None if self.closed_at is None else self.closed_at.isoformat(),
            "closed_by": self.closed_by,
        }


def compare_unit_price(a: OfferRow, b: OfferRow) -> int:
    """Cheaper per unit first (``p/r`` compared by cross-multiplication), then older."""
    left = a.remaining_price * b.remaining_amount
    right = b.remaining_price * a.remaining_amount
    if left != right:
        return -1 if left < right else 1
    if a.created_at != b.created_at:
        return -1 if a.created_at < b.created_at else 1
    return -1 if a.id < b.id else (1 if a.id > b.id else 0)


def open_offers(
    session: Session,
    *,
    now: datetime,
    sell_asset: str | None = None,
    price_asset: str | None = None,
    seller: str | None = None,
    limit: int = 100,
) -> list[OfferRow]:
    """Open, unexpired offers, best unit price first."""
    stmt = select(*_OFFER_COLUMNS).where(
        offers_t.c.status == "open",
        or_(offers_t.c.expires_at.is_(None), offers_t.c.expires_at > now),
    )
    if sell_asset is not None:
        stmt = stmt.where(offers_t.c.sell_asset == sell_asset)
    if price_asset is not None:
        stmt = stmt.where(offers_t.c.price_asset == price_asset)
    if seller is not None:
        stmt = stmt.where(offers_t.c.seller == seller)
    rows = [OfferRow(**r._mapping) for r in session.execute(stmt)]
    rows.sort(key=functools.cmp_to_key(compare_unit_price))
    return rows[:limit]


def get_offer(session: Session, offer_id: str) -> OfferRow:
    row = session.execute(select(*_OFFER_COLUMNS).where(offers_t.c.id == offer_id)).first()
    if row is None:
        raise NotFound(f"no offer {offer_id}", detail={"offer_id": offer_id})
    return OfferRow(**row._mapping)


def trades(
    session: Session, *, account: str | None, limit: int = 100, before: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Fills where ``account`` bought or sold (every fill for ``None``), newest first.

    ``before`` is the cursor of the previous page (a journal seq)."""
    stmt = (
        select(
            fills_t.c.id,
            fills_t.c.offer_id,
            fills_t.c.seller,
            fills_t.c.buyer,
            fills_t.c.sell_asset,
            fills_t.c.amount,
            fills_t.c.price_asset,
            fills_t.c.payment,
            fills_t.c.fee,
            fills_t.c.created_at,
            entries_t.c.seq,
        )
        .join(entries_t, entries_t.c.envelope_id == fills_t.c.id)
        .order_by(entries_t.c.seq.desc())
        .limit(limit + 1)
    )
    if account is not None:
        stmt = stmt.where(or_(fills_t.c.buyer == account, fills_t.c.seller == account))
    position = parse_cursor(before)
    if position is not None:
        stmt = stmt.where(entries_t.c.seq < position)
    rows = session.execute(stmt).all()
    items = []
    for r in rows[:limit]:
        item: dict[str, Any] = {
            "id": r.id,
            "seq": int(r.seq),
            "offer_id": r.offer_id,
            "seller": r.seller,
            "buyer": r.buyer,
            "sell_asset": r.sell_asset,
            "amount": int(r.amount),
            "price_asset": r.price_asset,
            "payment": int(r.payment),
            "fee": int(r.fee),
            "created_at": r.created_at.isoformat(),
        }
        if account is not None:
            item["side"] = "buy" if r.buyer == account else "sell"
        items.append(item)
    cursor = str(items[-1]["seq"]) if len(rows) > limit else None
    return items, cursor


# --- withdrawals waiting for the operator ------------------------------------------------


def store_withdrawal(
    session: Session, ctx: LedgerContext, raw: object, *, now: datetime, precheck: Precheck
) -> tuple[dict[str, Any], bool]:
    """Keep a withdrawal envelope signed by its owner until the operator countersigns it.

    Checks what can be checked now: the envelope and payload (decoded, and signatures
    verified, by the write path's ``precheck``: ``ubc.envelopes.service.precheck``), the
    ledger origin and time window, and that the owner's current key signed it. Returns
    the item and whether it is new (the same envelope again is answered as stored).
    """
    [checked] = precheck(session, ctx, [raw])
    decoded = checked.decoded
    if isinstance(decoded, UbcError):
        raise decoded
    if decoded.type != "withdrawal":
        raise BadRequest(
            f"expected a withdrawal envelope, got {decoded.type}", detail={"type": decoded.type}
        )
    payload = decoded.payload
    assert isinstance(payload, Withdrawal)
    if payload.ledger != ctx.origin:
        raise InvalidPayload(
            f"envelope is for ledger {payload.ledger!r}, this is {ctx.origin!r}",
            detail={"ledger": payload.ledger, "expected": ctx.origin},
        )
    created = datetime.fromisoformat(payload.created_at)
    if abs(created - now) > ctx.skew:
        raise InvalidPayload(
            f"created_at {payload.created_at} is outside the accepted window",
            detail={"created_at": payload.created_at, "now": format_timestamp(now)},
        )
    check_text(payload)  # its external reference, as /api/envelopes will check it
    if not payload.from_.startswith("member:") or payload.actor != payload.from_:
        raise Forbidden("a member asks for a withdrawal from its own account (actor = from)")
    handle = payload.from_.removeprefix("member:")
    current = session.execute(
        select(keys_t.c.keyid).where(keys_t.c.handle == handle, keys_t.c.current)
    ).scalar_one_or_none()
    if current is None or current not in checked.verified:
        raise Forbidden(
            f"the withdrawal must be signed by the current key of {payload.from_}",
            detail={"account": payload.from_},
        )
    body = json.dumps(raw, sort_keys=True)
    existing = session.execute(
        select(withdrawals_t.c.envelope).where(withdrawals_t.c.id == payload.id)
    ).first()
    if existing is not None:
        if existing.envelope != body:
            raise IdempotencyConflict(
                f"id {payload.id} was already used with a different envelope",
                detail={"id": payload.id},
            )
        return get_withdrawal(session, payload.id), False
    used = session.execute(
        select(refs_t.c.envelope_id).where(refs_t.c.ref == payload.external_ref)
    ).first()
    if used is not None:
        raise IdempotencyConflict(
            f"external_ref {payload.external_ref!r} was already used by envelope "
            f"{used.envelope_id}",
            detail={"external_ref": payload.external_ref, "envelope_id": used.envelope_id},
        )
    waiting = session.execute(
        select(withdrawals_t.c.id)
        .outerjoin(requests_t, requests_t.c.id == withdrawals_t.c.id)
        .where(withdrawals_t.c.external_ref == payload.external_ref, requests_t.c.id.is_(None))
    ).first()
    if waiting is not None:
        raise IdempotencyConflict(
            f"external_ref {payload.external_ref!r} is already waiting as withdrawal {waiting.id}",
            detail={"external_ref": payload.external_ref, "id": waiting.id},
        )
    session.execute(
        insert(withdrawals_t).values(
            id=payload.id,
            account=payload.from_,
            asset=payload.asset,
            amount=payload.amount,
            external_ref=payload.external_ref,
            envelope=body,
            created_at=now,
        )
    )
    session.flush()
    return get_withdrawal(session, payload.id), True


_WITHDRAWAL_COLUMNS = (
    withdrawals_t.c.id,
    withdrawals_t.c.account,
    withdrawals_t.c.asset,
    withdrawals_t.c.amount,
    withdrawals_t.c.external_ref,
    withdrawals_t.c.envelope,
    withdrawals_t.c.created_at,
    requests_t.c.status,
    requests_t.c.result,
)
WITHDRAWAL_STATUSES = ("pending", "done", "failed")


def _withdrawal_json(row: Any) -> dict[str, Any]:
    status = {"applied": "done", "failed": "failed"}.get(row.status, "pending")
    item: dict[str, Any] = {
        "id": row.id,
        "account": row.account,
        "asset": row.asset,
        "amount": int(row.amount),
        "external_ref": row.external_ref,
        "envelope": json.loads(row.envelope),
        "created_at": row.created_at.isoformat(),
        "status": status,
    }
    if status == "failed":
        try:
            error = json.loads(row.result)
            item["error"] = {"type": error.get("type"), "message": error.get("message")}
        except (TypeError, ValueError):
            item["error"] = None
    return item


def _withdrawals_query() -> Any:
    return select(*_WITHDRAWAL_COLUMNS).outerjoin(requests_t, requests_t.c.id == withdrawals_t.c.id)


def get_withdrawal(session: Session, withdrawal_id: str) -> dict[str, Any]:
    row = session.execute(_withdrawals_query().where(withdrawals_t.c.id == withdrawal_id)).first()
    if row is None:
        raise NotFound(f"no withdrawal {withdrawal_id}", detail={"id": withdrawal_id})
    return _withdrawal_json(row)


def list_withdrawals(
    session: Session, *, status: str | None, account: str | None, limit: int = 100
) -> list[dict[str, Any]]:
    stmt = _withdrawals_query().order_by(withdrawals_t.c.created_at, withdrawals_t.c.id)
    if status == "pending":
        stmt = stmt.where(requests_t.c.id.is_(None))
    elif status == "done":
        stmt = stmt.where(requests_t.c.status == "applied")
    elif status == "failed":
        stmt = stmt.where(requests_t.c.status == "failed")
    elif status is not None:
        raise BadRequest(
            f"status is one of {', '.join(WITHDRAWAL_STATUSES)}", detail={"status": status}
        )
    if account is not None:
        stmt = stmt.where(withdrawals_t.c.account == account)
    return [_withdrawal_json(r) for r in session.execute(stmt.limit(limit))]


__all__ = [
    "EXPIRE_BATCH",
    "OfferRow",
    "compare_unit_price",
    "expire_due_offers",
    "get_offer",
    "get_withdrawal",
    "list_withdrawals",
    "open_offers",
    "store_withdrawal",
    "trades",
]
