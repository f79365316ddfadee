"""Rules of the compute market (DESIGN sections 4 and 6): backed offers, delivery versus
payment, exact integer pricing.

- ``offer.create`` (an active member): ``sell_amount`` of ``sell_asset`` moves from the
  seller to ``market:escrow`` at once (one posted leg, kind ``trade``), so an offer is
  always backed and nobody can sell or spend the same units twice. The offer's id is the
  envelope's id. ``sell_asset`` and ``price_asset`` differ; ``expires_at``, if given, is in
  the future.
- ``offer.fill`` (another active member) of ``a`` units out of the ``r`` still offered,
  whose price together is ``p``: the buyer pays ``ceil(p × a / r)``; so the last fill pays
  exactly what is left and a fully filled offer pays exactly ``price_amount``, and no
  rounding ever creates or destroys value (the offer's remaining price goes down by what
  was paid). The fee is ``floor(payment × market_fee_bps / 10000)`` of the configuration
  in force, paid by the seller out of the payment. One linked batch, all or nothing:
  buyer → seller ``payment − fee`` (trade), buyer → ``system:fees`` ``fee`` (fee), escrow
  → buyer ``a`` (trade); a leg of 0 is left out (a payment can be 0 once an offer's price
  is all paid and units remain: the seller already has its whole price).
- ``offer.cancel`` (the seller) and ``offer.expire`` (the ledger, once ``expires_at`` has
  passed) return what is left from escrow.

**Escrowed compute and epoch closes.** Units on offer are not in the seller's account, so
an ``epoch.close`` does not expire them and the offer stays open: a buyer may still buy
them. When the unsold rest comes back to the seller (cancel or expiry) after one or more
closes of its asset with a carryover cap, it comes back as if it had stayed in the
seller's account through those closes: after each such close, in order, the seller keeps
at most ``cap − posted balance right after that close`` (never below 0) of it, and the
rest goes to ``system:expired`` (kind ``expiry``). So putting compute on the market at a
price nobody pays cannot carry it past the cap, and a seller loses nothing it would have
kept. The posted balance after a close is read from the seller's postings up to the
close's last posting: the same on the live ledger and in the auditor's replay.

**Batches.** The writer plans every envelope of a batch before applying its ledger
operations in one group commit. An envelope on an offer that an earlier envelope of the
same batch touched first has the writer apply what is planned (``state.flush``), then
reads the offer as that left it: a fill after a failed fill of the same offer is planned
on the offer as it really is. Batches are serialised by the journal head lock, so
concurrent buyers on any number of processes never oversell; escrow, a non-negative
account, is the last guard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, text, update

from ubc.envelopes.payloads import (
    OfferCancel,
    OfferCreate,
    OfferExpire,
    OfferFill,
    Payload,
    parse_timestamp,
)
from ubc.envelopes.rules import Plan, Signers, State, _active_member, _ledger_signed
from ubc.errors import BadRequest, Forbidden, NotFound, StateConflict
from ubc.ledger.service import Leg, Operation
from ubc.market.models import Fill, Offer

offers_t = Offer.__table__  # type: ignore[attr-defined]
fills_t = Fill.__table__  # type: ignore[attr-defined]

ESCROW = "market:escrow"
FEES = "system:fees"
EXPIRED = "system:expired"
BPS = 10_000
_BATCH_KEY = "ubc.market.offers"


@dataclass(frozen=True, slots=True)
class OfferView:
    """An offer as the rules see it."""

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
    closes_seen: int


def fill_payment(remaining_amount: int, remaining_price: int, amount: int) -> int:
    """What ``amount`` of the ``remaining_amount`` units costs: ``ceil(p × a / r)``."""
    if not 1 <= amount <= remaining_amount:
        raise ValueError("amount must be between 1 and the remaining amount")
    return -(-remaining_price * amount // remaining_amount)


def fill_fee(payment: int, fee_bps: int) -> int:
    """The seller's fee on a payment: ``floor(payment × bps / 10000)``."""
    return payment * fee_bps // BPS


# --- the rules ----------------------------------------------------------------------------


def offer_create(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, OfferCreate)
    handle = _active_member(state, payload.actor, signers)
    seller = f"member:{handle}"
    if payload.sell_asset == payload.price_asset:
        raise BadRequest(
            "an offer sells one asset for another: sell_asset and price_asset must differ",
            detail={"asset": payload.sell_asset},
        )
    for asset in (payload.sell_asset, payload.price_asset):
        if asset not in state.ctx.assets:
            raise BadRequest(f"unknown asset {asset}", detail={"asset": asset})
    expires = parse_timestamp(payload.expires_at) if payload.expires_at else None
    if expires is not None and expires <= state.now:
        raise BadRequest(
            "expires_at must be in the future", detail={"expires_at": payload.expires_at}
        )
    view = OfferView(
        id=payload.id,
        seller=seller,
        sell_asset=payload.sell_asset,
        sell_amount=payload.sell_amount,
        price_asset=payload.price_asset,
        price_amount=payload.price_amount,
        remaining_amount=payload.sell_amount,
        remaining_price=payload.price_amount,
        status="open",
        expires_at=expires,
        closes_seen=_capped_closes(state, payload.sell_asset),
    )
    leg = Leg(seller, ESCROW, payload.sell_asset, payload.sell_amount, "trade", _memo(payload.id))

    def after() -> None:
        state.session.execute(
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
                created_at=state.now,
            )
        )

    _batch(state)[view.id] = view
    return Plan(operations=(leg,), accounts=frozenset({seller}), after=after)


def offer_fill(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, OfferFill)
    handle = _active_member(state, payload.actor, signers)
    buyer = f"member:{handle}"
    view, before = _load(state, payload.offer_id)
    if view.seller == buyer:
        raise Forbidden("a member may not fill its own offer", detail={"offer_id": view.id})
    _require_open(state, view)
    if payload.amount > view.remaining_amount:
        raise StateConflict(
            f"offer {view.id} has {view.remaining_amount} {view.sell_asset} left, "
            f"{payload.amount} asked",
            detail={
                "offer_id": view.id,
                "remaining": view.remaining_amount,
                "amount": payload.amount,
            },
        )
    payment = fill_payment(view.remaining_amount, view.remaining_price, payload.amount)
    fee = fill_fee(payment, int(state.config().get("market_fee_bps", 0)))
    memo = _memo(view.id)
    legs: list[Operation] = []
    if payment - fee > 0:
        legs.append(Leg(buyer, view.seller, view.price_asset, payment - fee, "trade", memo))
    if fee > 0:
        legs.append(Leg(buyer, FEES, view.price_asset, fee, "fee", memo))
    legs.append(Leg(ESCROW, buyer, view.sell_asset, payload.amount, "trade", memo))
    left = view.remaining_amount - payload.amount
    new = replace(
        view,
        remaining_amount=left,
        remaining_price=view.remaining_price - payment,
        status="open" if left else "filled",
    )

    def after() -> None:
        _store(state, new, payload.id)
        state.session.execute(
            insert(fills_t).values(
                id=payload.id,
                offer_id=view.id,
                seller=view.seller,
                buyer=buyer,
                sell_asset=view.sell_asset,
                amount=payload.amount,
                price_asset=view.price_asset,
                payment=payment,
                fee=fee,
                created_at=state.now,
            )
        )

    _batch(state)[view.id] = new
    return Plan(
        operations=tuple(legs),
        accounts=frozenset({buyer, view.seller}),
        after=after,
        before=before,
    )


def offer_cancel(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, OfferCancel)
    handle = _active_member(state, payload.actor, signers)
    view, before = _load(state, payload.offer_id)
    if view.seller != f"member:{handle}":
        raise Forbidden(
            f"only the seller {view.seller} may cancel this offer", detail={"offer_id": view.id}
        )
    _require_open(state, view, allow_expired=True)
    return _close(state, view, payload.id, "cancelled", before)


def offer_expire(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, OfferExpire)
    _ledger_signed(payload, signers)
    view, before = _load(state, payload.offer_id)
    _require_open(state, view, allow_expired=True)
    if view.expires_at is None or view.expires_at > state.now:
        raise StateConflict(
            f"offer {view.id} has not expired yet",
            detail={
                "offer_id": view.id,
                "expires_at": None if view.expires_at is None else view.expires_at.isoformat(),
            },
        )
    return _close(state, view, payload.id, "expired", before)


# --- internals --------------------------------------------------------------------------


def _memo(offer_id: str) -> str:
    return f"offer {offer_id}"


def _batch(state: State) -> dict[str, OfferView]:
    """Offers as the envelopes planned so far in this batch left them."""
    info = state.session.info
    held = info.get(_BATCH_KEY)
    if held is None or held[0] is not state:
        held = (state, {})
        info[_BATCH_KEY] = held
    offers: dict[str, OfferView] = held[1]
    return offers


def _read(state: State, offer_id: str) -> OfferView | None:
    row = state.session.execute(
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
    return None if row is None else OfferView(*row)


Before = Callable[[], None] | None


def _load(state: State, offer_id: str) -> tuple[OfferView, Before]:
    """The offer as it is now. If an earlier envelope of this batch touched it, what is
    planned is applied first (``state.flush``), so this one is planned on its result."""
    if offer_id in _batch(state):
        state.flush()
        _batch(state).clear()
    view = _read(state, offer_id)
    if view is None:
        raise NotFound(f"no offer {offer_id}", detail={"offer_id": offer_id})
    return view, None


def _require_open(state: State, view: OfferView, *, allow_expired: bool = False) -> None:
    if view.status != "open":
        raise StateConflict(
            f"offer {view.id} is {view.status}",
            detail={"offer_id": view.id, "status": view.status},
        )
    if not allow_expired and view.expires_at is not None and view.expires_at <= state.now:
        raise StateConflict(
            f"offer {view.id} has expired",
            detail={"offer_id": view.id, "status": "expired"},
        )


def _close(state: State, view: OfferView, envelope_id: str, status: str, before: Before) -> Plan:
    """Return what is left of ``view`` from escrow (as the epoch-close rule says)."""
    kept = _kept_after_closes(state, view)
    memo = _memo(view.id)
    legs: list[Operation] = []
    if kept:
        legs.append(Leg(ESCROW, view.seller, view.sell_asset, kept, "trade", memo))
    if view.remaining_amount - kept:
        legs.append(
            Leg(ESCROW, EXPIRED, view.sell_asset, view.remaining_amount - kept, "expiry", memo)
        )
    new = replace(view, status=status)

    def after() -> None:
        _store(state, new, envelope_id)

    _batch(state)[view.id] = new
    return Plan(
        operations=tuple(legs), accounts=frozenset({view.seller}), after=after, before=before
    )


def _store(state: State, view: OfferView, envelope_id: str) -> None:
    values: dict[str, Any] = {
        "remaining_amount": view.remaining_amount,
        "remaining_price": view.remaining_price,
        "status": view.status,
    }
    if view.status != "open":
        values.update(closed_at=state.now, closed_by=envelope_id)
    state.session.execute(update(offers_t).where(offers_t.c.id == view.id).values(**values))


def _capped_closes(state: State, asset: str) -> int:
    return int(
        state.session.execute(
            text(
                "SELECT count(*) FROM epochs WHERE asset = :asset AND status = 'closed' "
                "AND carryover_cap IS NOT NULL"
            ),
            {"asset": asset},
        ).scalar_one()
    )


def _kept_after_closes(state: State, view: OfferView) -> int:
    """How much of the remainder the seller keeps under the epoch-close rule."""
    kept = view.remaining_amount
    if _capped_closes(state, view.sell_asset) <= view.closes_seen:
        return kept
    closes = state.session.execute(
        text(
            "SELECT carryover_cap, last_posting FROM epochs WHERE asset = :asset "
            "AND status = 'closed' AND carryover_cap IS NOT NULL "
            "ORDER BY last_posting, number"
        ),
        {"asset": view.sell_asset},
    ).all()
    account = state.session.execute(
        text("SELECT id FROM accounts WHERE address = :address AND asset = :asset"),
        {"address": view.seller, "asset": view.sell_asset},
    ).scalar_one()
    for cap, last_posting in closes[view.closes_seen :]:
        balance = state.session.execute(
            text(
                "SELECT balance_after FROM postings WHERE account_id = :account "
                "AND id <= :last ORDER BY id DESC LIMIT 1"
            ),
            {"account": account, "last": int(last_posting or 0)},
        ).scalar_one_or_none()
        kept = min(kept, max(0, int(cap) - int(balance or 0)))
    return kept
