"""Tables of allocation epochs: the epoch and the allocations it snapshots."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, String, Text
from sqlmodel import Field, SQLModel

from ubc.dbtypes import UTCDateTime


class Epoch(SQLModel, table=True):
    """An epoch: ``opening`` while its allocations are applied in batches, then ``open``,
    then ``closed``."""

    __tablename__ = "epochs"

    number: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    asset: str = Field(sa_column=Column(String(16), nullable=False))
    allocations: str = Field(sa_column=Column(Text, nullable=False))
    carryover_cap: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    starts_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    ends_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    open_envelope_id: str = Field(sa_column=Column(String(36), nullable=False))
    close_envelope_id: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))
    opened_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    closed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    members: int = Field(sa_column=Column(BigInteger, nullable=False))
    applied: int = Field(sa_column=Column(BigInteger, nullable=False))
    issued: int = Field(sa_column=Column(BigInteger, nullable=False))
    expired_members: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    expired: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    # The epoch's window in posting order: postings with first_posting < id ≤ last_posting.
    # Marked in the transactions that journal open and close, so a transfer belongs to the
    # epoch exactly when the journal puts it between them.
    first_posting: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    last_posting: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class EpochAllocation(SQLModel, table=True):
    """The members an epoch allocates to, fixed when it opens; ``leg`` orders them by handle
    and names their transfer ``<epoch.open id>:<leg>``."""

    __tablename__ = "epoch_allocations"
    __table_args__ = (Index("ix_epoch_allocations_account", "account_id"),)

    epoch: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    leg: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    account_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    tier: str = Field(sa_column=Column(String(32), nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))


class EpochExpiry(SQLModel, table=True):
    """What an epoch's close expired per member account, legs ordered by address."""

    __tablename__ = "epoch_expiries"

    epoch: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    leg: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    account_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
