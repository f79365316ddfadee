"""What the market's routes answer (``ubc/market/routes.py``): offers, trades and the
withdrawals waiting for the operator. Pure pydantic, for ``response_model=``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from ubc.schemas import Schema, absent

__all__ = [
    "Offer",
    "OfferList",
    "Trade",
    "TradePage",
    "WithdrawalError",
    "WithdrawalList",
    "WithdrawalRequest",
]


class Offer(Schema):
    """An offer; ``remaining_price`` is what its ``remaining_amount`` units cost together."""

    id: str
    seller: str
    sell_asset: str
    sell_amount: int
    price_asset: str
    price_amount: int
    remaining_amount: int
    remaining_price: int
    sold: int
    status: str = Field(description="open, filled, cancelled or expired")
    expires_at: str | None
    created_at: str
    closed_at: str | None
    closed_by: str | None


class OfferList(Schema):
    """``GET /api/market/offers``: open offers, best unit price first."""

    offers: list[Offer]


class Trade(Schema):
    """One fill; ``side`` only when read for one account."""

    id: str
    seq: int
    offer_id: str
    seller: str
    buyer: str
    sell_asset: str
    amount: int
    price_asset: str
    payment: int
    fee: int
    created_at: str
    # Absent (never null) when the trades of every account are read.
    side: Annotated[str, absent("buy or sell, from the account's side")]


class TradePage(Schema):
    """``GET /api/market/trades``: newest first."""

    account: str | None = Field(description="the account asked for; null for every fill")
    trades: list[Trade]
    next_cursor: str | None = Field(description="null on the last page")


class WithdrawalError(Schema):
    type: str | None
    message: str | None


class WithdrawalRequest(Schema):
    """A withdrawal its owner signed, waiting for (or past) the operator's signature."""

    id: str
    account: str
    asset: str
    amount: int
    external_ref: str
    envelope: dict[str, Any] = Field(description="the envelope as the owner signed it")
    created_at: str
    status: str = Field(description="pending, done or failed")
    # Only for a failed one (null if its error could not be read).
    error: Annotated[WithdrawalError | None, absent("only when status is failed")]


class WithdrawalList(Schema):
    """``GET /api/withdrawals``: oldest first."""

    withdrawals: list[WithdrawalRequest]
