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
same batch touched first is read as that envelope left it once applied (the write
path's lookup applies what is planned first): a fill after a failed fill of the same
offer is planned on the offer as it really is. Batches are serialised by the journal head lock, so
concurrent buyers on any number of processes never oversell; escrow, a non-negative
account, is the last guard.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from ubc.errors import BadRequest, Forbidden, NotFound, StateConflict
from ubc.market.payloads import OfferCancel, OfferCreate, OfferExpire, OfferFill
from ubc.rules import (
    Change,
    Leg,
    Lookup,
    Operation,
    Plan,
    RuleContext,
    RuleSpec,
    Signers,
    active_member,
    require_ledger,
)
from ubc.rules.payload import parse_timestamp

ESCROW = "market:escrow"
FEES = "system:fees"
EXPIRED = "system:expired"
BPS = 10_000


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


class MarketLookup(Lookup, Protocol):
    def offer(self, offer_id: str) -> OfferView | None:
        """The offer as the envelopes before this one left it, once applied."""
        ...

    def capped_closes(self, asset: str) -> int:
        """How many closed epochs of ``asset`` had a carryover cap."""
        ...

    def capped_close_list(self, asset: str) -> list[tuple[int, int]]:
        """Those closes' (cap, last posting), in the order they closed."""
        ...

    def posted_balance_at(self, address: str, asset: str, last_posting: int) -> int:
        """The account's posted balance right after posting ``last_posting``."""
        ...


@dataclass(frozen=True, slots=True)
class OfferCreated(Change):
    offer: OfferView
    created_at: datetime

    @property
    def offer_id(self) -> str:
        return self.offer.id


@dataclass(frozen=True, slots=True)
class OfferUpdated(Change):
    """What is left of an offer and its status; closed by ``envelope_id`` unless open."""

    offer: OfferView
    envelope_id: str

    @property
    def offer_id(self) -> str:
        return self.offer.id


@dataclass(frozen=True, slots=True)
class FillRecorded(Change):
    id: str
    offer_id: str
    seller: str
    buyer: str
    sell_asset: str
    amount: int
    price_asset: str
    payment: int
    fee: int


def fill_payment(remaining_amount: int, remaining_price: int, amount: int) -> int:
    """What ``amount`` of the ``remaining_amount`` units costs: ``ceil(p × a / r)``."""
    if not 1 <= amount <= remaining_amount:
        raise ValueError("amount must be between 1 and the remaining amount")
    return -(-remaining_price * amount // remaining_amount)


def fill_fee(payment: int, fee_bps: int) -> int:
    """The seller's fee on a payment: ``floor(payment × bps / 10000)``."""
    return payment * fee_bps // BPS


# --- the rules ----------------------------------------------------------------------------


def offer_create(
    look: MarketLookup, ctx: RuleContext, payload: OfferCreate, signers: Signers
) -> Plan:
    handle = active_member(look, payload.actor, signers)
    seller = f"member:{handle}"
    if payload.sell_asset == payload.price_asset:
        raise BadRequest(
            "an offer sells one asset for another: sell_asset and price_asset must differ",
            detail={"asset": payload.sell_asset},
        )
    for asset in (payload.sell_asset, payload.price_asset):
        if asset not in ctx.assets:
            raise BadRequest(f"unknown asset {asset}", detail={"asset": asset})
    expires = parse_timestamp(payload.expires_at) if payload.expires_at else None
    if expires is not None and expires <= ctx.now:
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
        closes_seen=look.capped_closes(payload.sell_asset),
    )
    leg = Leg(seller, ESCROW, payload.sell_asset, payload.sell_amount, "trade", _memo(payload.id))
    return Plan(
        operations=(leg,),
        accounts=frozenset({seller}),
        changes=(OfferCreated(view, ctx.now),),
    )


def offer_fill(look: MarketLookup, ctx: RuleContext, payload: OfferFill, signers: Signers) -> Plan:
    handle = active_member(look, payload.actor, signers)
    buyer = f"member:{handle}"
    view = _load(look, payload.offer_id)
    if view.seller == buyer:
        raise Forbidden("a member may not fill its own offer", detail={"offer_id": view.id})
    _require_open(ctx, view)
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
    fee = fill_fee(payment, int(look.config().get("market_fee_bps", 0)))
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
    fill = FillRecorded(
        payload.id,
        view.id,
        view.seller,
        buyer,
        view.sell_asset,
        payload.amount,
        view.price_asset,
        payment,
        fee,
    )
    return Plan(
        operations=tuple(legs),
        accounts=frozenset({buyer, view.seller}),
        changes=(OfferUpdated(new, payload.id), fill),
    )


def offer_cancel(
    look: MarketLookup, ctx: RuleContext, payload: OfferCancel, signers: Signers
) -> Plan:
    handle = active_member(look, payload.actor, signers)
    view = _load(look, payload.offer_id)
    if view.seller != f"member:{handle}":
        raise Forbidden(
            f"only the seller {view.seller} may cancel this offer", detail={"offer_id": view.id}
        )
    _require_open(ctx, view, allow_expired=True)
    return _close(look, view, payload.id, "cancelled")


def offer_expire(
    look: MarketLookup, ctx: RuleContext, payload: OfferExpire, signers: Signers
) -> Plan:
    require_ledger(payload, signers)
    view = _load(look, payload.offer_id)
    _require_open(ctx, view, allow_expired=True)
    if view.expires_at is None or view.expires_at > ctx.now:
        raise StateConflict(
            f"offer {view.id} has not expired yet",
            detail={
                "offer_id": view.id,
                "expires_at": None if view.expires_at is None else view.expires_at.isoformat(),
            },
        )
    return _close(look, view, payload.id, "expired")


RULES = (
    RuleSpec("offer.create", OfferCreate, offer_create),
    RuleSpec("offer.fill", OfferFill, offer_fill),
    RuleSpec("offer.cancel", OfferCancel, offer_cancel),
    RuleSpec("offer.expire", OfferExpire, offer_expire, submit="ledger"),
)


# --- internals --------------------------------------------------------------------------


def _memo(offer_id: str) -> str:
    return f"offer {offer_id}"


def _load(look: MarketLookup, offer_id: str) -> OfferView:
    view = look.offer(offer_id)
    if view is None:
        raise NotFound(f"no offer {offer_id}", detail={"offer_id": offer_id})
    return view


def _require_open(ctx: RuleContext, view: OfferView, *, allow_expired: bool = False) -> None:
    if view.status != "open":
        raise StateConflict(
            f"offer {view.id} is {view.status}",
            detail={"offer_id": view.id, "status": view.status},
        )
    if not allow_expired and view.expires_at is not None and view.expires_at <= ctx.now:
        raise StateConflict(
            f"offer {view.id} has expired",
            detail={"offer_id": view.id, "status": "expired"},
        )


def _close(look: MarketLookup, view: OfferView, envelope_id: str, status: str) -> Plan:
    """Return what is left of ``view`` from escrow (as the epoch-close rule says)."""
    kept = _kept_after_closes(look, view)
    memo = _memo(view.id)
    legs: list[Operation] = []
    if kept:
        legs.append(Leg(ESCROW, view.seller, view.sell_asset, kept, "trade", memo))
    if view.remaining_amount - kept:
        legs.append(
            Leg(ESCROW, EXPIRED, view.sell_asset, view.remaining_amount - kept, "expiry", memo)
        )
    new = replace(view, status=status)
    return Plan(
        operations=tuple(legs),
        accounts=frozenset({view.seller}),
        changes=(OfferUpdated(new, envelope_id),),
    )


def _kept_after_closes(look: MarketLookup, view: OfferView) -> int:
    """How much of the remainder the seller keeps under the epoch-close rule."""
    kept = view.remaining_amount
    if look.capped_closes(view.sell_asset) <= view.closes_seen:
        return kept
    closes = look.capped_close_list(view.sell_asset)
    for cap, last_posting in closes[view.closes_seen :]:
        balance = look.posted_balance_at(view.seller, view.sell_asset, last_posting)
        kept = min(kept, max(0, cap - balance))
    return kept
