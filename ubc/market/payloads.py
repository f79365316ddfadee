"""Payload schemas of the compute market."""

from __future__ import annotations

from ubc.rules.payload import Amount, AssetCode, Payload, Timestamp, Uuid


class OfferCreate(Payload):
    """Offer ``sell_amount`` for ``price_amount`` in all; the CU moves to escrow at once."""

    sell_asset: AssetCode
    sell_amount: Amount
    price_asset: AssetCode
    price_amount: Amount
    expires_at: Timestamp | None = None


class OfferFill(Payload):
    offer_id: Uuid
    amount: Amount


class OfferCancel(Payload):
    offer_id: Uuid


class OfferExpire(Payload):
    """An offer past its ``expires_at`` (ledger key): what is left returns to the seller."""

    offer_id: Uuid
