"""Tables of the double-entry core: assets, accounts, transfers, postings, requests.

Every amount is a 64-bit integer. An account row is one (address, asset) pair with
the four counters of DESIGN section 3; its balance is ``credits_posted -
debits_posted`` and what it may still spend is that minus ``debits_pending``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

from ubc.dbtypes import BigIntPK, UTCDateTime


class Asset(SQLModel, table=True):
    __tablename__ = "assets"

    code: str = Field(sa_column=Column(String(16), primary_key=True))
    scale: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class Account(SQLModel, table=True):
    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("address", "asset", name="uq_accounts_address_asset"),
        # On PostgreSQL the address is COLLATE "C" in this index (migration 0006): member
        # accounts by address in code-point order, as a close step and the report read them.
        Index("ix_accounts_asset_address_c", "asset", "address"),
        CheckConstraint(
            "NOT non_negative OR credits_posted - debits_posted - debits_pending >= 0",
            name="ck_accounts_non_negative",
        ),
    )

    id: int | None = Field(default=None, sa_column=Column(BigIntPK, primary_key=True))
    address: str = Field(sa_column=Column(String(80), nullable=False))
    asset: str = Field(sa_column=Column(String(16), ForeignKey("assets.code"), nullable=False))
    # Member, cause and escrow accounts may never go below zero, pending holds included.
    non_negative: bool = Field(sa_column=Column(Boolean, nullable=False))
    debits_posted: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    credits_posted: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    debits_pending: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    credits_pending: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class Transfer(SQLModel, table=True):
    """One leg: a debit account, a credit account, one asset, a positive amount.

    ``id`` is ``<request id>:<leg index>``, so every leg of a request is one range of the
    primary key. ``phase`` is ``posted`` or ``pending`` for a new transfer, ``post`` or
    ``void`` for one that resolves the pending transfer named by ``pending_id``. A pending
    transfer carries its ``state`` (pending, posted, voided, expired) and ``timeout_at``.

    The account columns carry no foreign key: the core writes a transfer only after it
    has loaded and locked both accounts, and a per-row trigger would cost the write path
    more than the transfer itself.
    """

    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_transfers_amount_positive"),
        # Only open holds are indexed for the expiry sweeper.
        Index(
            "ix_transfers_open_holds",
            "timeout_at",
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
    )

    id: str = Field(sa_column=Column(String(112), primary_key=True))
    debit_account_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    credit_account_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    asset: str = Field(sa_column=Column(String(16), nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    phase: str = Field(sa_column=Column(String(8), nullable=False))
    pending_id: str | None = Field(default=None, sa_column=Column(String(112), nullable=True))
    state: str | None = Field(default=None, sa_column=Column(String(8), nullable=True))
    timeout_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    memo: str | None = Field(default=None, sa_column=Column(String(256), nullable=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class Posting(SQLModel, table=True):
    """What one transfer did to one account, with the account's balances after it.

    ``posted`` is added to the side's posted counter and ``pending`` (signed) to its
    pending counter, so summing an account's postings rebuilds its four counters.
    """

    __tablename__ = "postings"
    __table_args__ = (Index("ix_postings_account_id_id", "account_id", "id"),)

    id: int | None = Field(default=None, sa_column=Column(BigIntPK, primary_key=True))
    account_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    transfer_id: str = Field(sa_column=Column(String(112), nullable=False))
    side: str = Field(sa_column=Column(String(1), nullable=False))
    posted: int = Field(sa_column=Column(BigInteger, nullable=False))
    pending: int = Field(sa_column=Column(BigInteger, nullable=False))
    balance_after: int = Field(sa_column=Column(BigInteger, nullable=False))
    available_after: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class Request(SQLModel, table=True):
    """The idempotency record of one client id: its payload's hash and its outcome.

    ``result`` holds a failure's error; an applied request's effects are its transfers.
    """

    __tablename__ = "requests"

    id: str = Field(sa_column=Column(String(96), primary_key=True))
    payload_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    status: str = Field(sa_column=Column(String(8), nullable=False))
    result: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class LedgerConfigRow(SQLModel, table=True):
    """One row per journal entry that set the configuration; the highest ``id`` is in force.

    ``body`` is that payload's JSON (prices per model, market fee, CU price), so the rules
    read the prices of their own moment in the journal, live and in an auditor's replay.
    """

    __tablename__ = "ledger_config"

    id: int | None = Field(default=None, sa_column=Column(BigIntPK, primary_key=True))
    envelope_id: str = Field(sa_column=Column(String(36), nullable=False, unique=True))
    body: str = Field(sa_column=Column(Text, nullable=False))
