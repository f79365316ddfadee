"""Tables of the market: offers and their fills (derived from journaled offer.* entries),
and withdrawals members asked for that wait for the operator's countersignature."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, ForeignKey, Index, String, Text
from sqlmodel import Field, SQLModel

from ubc.dbtypes import UTCDateTime


class Offer(SQLModel, table=True):
    """An offer: ``sell_amount`` of ``sell_asset`` for ``price_amount`` of ``price_asset``.

    Its id is the id of the ``offer.create`` envelope. ``remaining_amount`` units are in
    ``market:escrow`` while it is open; ``remaining_price`` is what they cost together.
    Once closed (filled, cancelled, expired) the remaining columns keep what was unsold.
    """

    __tablename__ = "offers"
    __table_args__ = (
        Index("ix_offers_status_assets", "status", "sell_asset", "price_asset"),
        Index("ix_offers_status_expires", "status", "expires_at"),
    )

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    seller: str = Field(sa_column=Column(String(80), nullable=False, index=True))
    sell_asset: str = Field(sa_column=Column(String(16), nullable=False))
    sell_amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    price_asset: str = Field(sa_column=Column(String(16), nullable=False))
    price_amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    remaining_amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    remaining_price: int = Field(sa_column=Column(BigInteger, nullable=False))
    # open, filled, cancelled or expired
    status: str = Field(sa_column=Column(String(16), nullable=False))
    expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    # How many capped epochs of sell_asset had closed when the offer was made (the
    # epoch-close rule of escrowed compute, ubc.market.rules).
    closes_seen: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    closed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    closed_by: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))


class Fill(SQLModel, table=True):
    """One fill: ``amount`` units to ``buyer`` for ``payment``, of which ``fee`` to fees."""

    __tablename__ = "offer_fills"

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    offer_id: str = Field(
        sa_column=Column(String(36), ForeignKey("offers.id"), nullable=False, index=True)
    )
    seller: str = Field(sa_column=Column(String(80), nullable=False, index=True))
    buyer: str = Field(sa_column=Column(String(80), nullable=False, index=True))
    sell_asset: str = Field(sa_column=Column(String(16), nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    price_asset: str = Field(sa_column=Column(String(16), nullable=False))
    payment: int = Field(sa_column=Column(BigInteger, nullable=False))
    fee: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class WithdrawalRequest(SQLModel, table=True):
    """A withdrawal envelope signed by its owner, waiting for the operator's signature.

    Not journaled and not applied: its status is read from the request record of its id
    (applied → done, failed → failed, none → pending).
    """

    __tablename__ = "withdrawal_requests"

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    account: str = Field(sa_column=Column(String(80), nullable=False, index=True))
    asset: str = Field(sa_column=Column(String(16), nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    external_ref: str = Field(sa_column=Column(String(128), nullable=False, index=True))
    envelope: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
