"""Tables of metered model calls (the gateway serves the calls; these record them).

``usage_records`` and ``apikey_spend`` are derived from journaled ``usage`` entries (an
auditor's replay rebuilds them); ``gateway_holds`` lists the calls in flight, whose holds
are reservations and are not journaled (DESIGN section 5).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, String
from sqlmodel import Field, SQLModel

from ubc.dbtypes import UTCDateTime


class UsageRecord(SQLModel, table=True):
    """One billed call: what the ``usage`` entry recorded."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_account_created", "account", "created_at"),
        Index("ix_usage_records_key_hash", "key_hash"),
    )

    request_id: str = Field(sa_column=Column(String(36), primary_key=True))
    envelope_id: str = Field(sa_column=Column(String(36), nullable=False))
    account: str = Field(sa_column=Column(String(80), nullable=False))
    key_hash: str = Field(sa_column=Column(String(64), nullable=False))
    model: str = Field(sa_column=Column(String(128), nullable=False))
    epoch: int = Field(sa_column=Column(BigInteger, nullable=False))
    input_tokens: int = Field(sa_column=Column(BigInteger, nullable=False))
    output_tokens: int = Field(sa_column=Column(BigInteger, nullable=False))
    held: int = Field(sa_column=Column(BigInteger, nullable=False))
    cost: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class ApiKeySpend(SQLModel, table=True):
    """What one API key has spent in one epoch (its grant's ``spend_cap_per_epoch``)."""

    __tablename__ = "apikey_spend"

    key_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    epoch: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    spent: int = Field(sa_column=Column(BigInteger, nullable=False))


class GatewayHold(SQLModel, table=True):
    """A call in flight: its hold, until a ``usage`` or ``hold.expire`` entry settles it."""

    __tablename__ = "gateway_holds"
    __table_args__ = (Index("ix_gateway_holds_key_epoch", "key_hash", "epoch"),)

    request_id: str = Field(sa_column=Column(String(36), primary_key=True))
    account: str = Field(sa_column=Column(String(80), nullable=False))
    key_hash: str = Field(sa_column=Column(String(64), nullable=False))
    model: str = Field(sa_column=Column(String(128), nullable=False))
    epoch: int = Field(sa_column=Column(BigInteger, nullable=False))
    held: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
