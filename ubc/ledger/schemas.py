"""What the ledger's read routes answer (``ubc/ledger/routes.py``): the ledger's public
facts, balances, history and transfers. Pure pydantic, for ``response_model=``."""

from __future__ import annotations

from pydantic import Field

from ubc.schemas import Schema

__all__ = [
    "Account",
    "AccountBalance",
    "AccountList",
    "AccountUsage",
    "Balance",
    "HistoryItem",
    "HistoryPage",
    "LedgerAsset",
    "LedgerInfo",
    "LedgerModelPrice",
    "Transfer",
    "TransferLeg",
    "UsageDay",
]


class LedgerAsset(Schema):
    scale: int = Field(description="decimal places of the asset's smallest unit")


class LedgerModelPrice(Schema):
    input: int = Field(description="CU per 1K input tokens")
    output: int = Field(description="CU per 1K output tokens")


class LedgerInfo(Schema):
    """``GET /api/ledger``: what a client needs to sign for this ledger and an auditor to
    verify it."""

    origin: str = Field(description="the ledger origin every payload names")
    vkey: str = Field(description="the note verifier key of the checkpoints")
    ledger_public_key: str
    operator_public_keys: list[str]
    assets: dict[str, LedgerAsset]
    enrollment: str = Field(description="open or invite")
    market_fee_bps: int
    cu_price_usd: str = Field(description="a decimal string")
    models: dict[str, LedgerModelPrice] = Field(description="published prices per model id")
    current_epoch: int | None = Field(description="the epoch opening or open, if any")


class Balance(Schema):
    asset: str
    posted: int
    pending_debits: int
    pending_credits: int
    available: int


class Account(Schema):
    """``GET /api/accounts/{address}``: balances per asset."""

    address: str
    balances: list[Balance]


class AccountBalance(Schema):
    address: str
    asset: str
    posted: int
    pending_debits: int
    pending_credits: int
    available: int


class AccountList(Schema):
    """``GET /api/accounts``: every account (operator and auditors)."""

    accounts: list[AccountBalance]


class HistoryItem(Schema):
    """One posting; ``amount`` is the signed change of this account's posted balance,
    ``pending`` that of its pending amount."""

    transfer_id: str
    kind: str
    phase: str
    asset: str
    amount: int
    pending: int
    counterparty: str
    balance_after: int
    available_after: int
    memo: str | None
    created_at: str = Field(description="ISO 8601 with an offset")


class HistoryPage(Schema):
    """``GET /api/accounts/{address}/history``: postings, newest first."""

    address: str
    items: list[HistoryItem]
    next_cursor: str | None = Field(description="null on the last page")


class TransferLeg(Schema):
    transfer_id: str
    kind: str
    phase: str
    debit: str
    credit: str
    asset: str
    amount: int
    pending_id: str | None = Field(description="the pending transfer a post or void resolves")
    state: str | None = Field(
        description="of a pending transfer: pending, posted, voided or expired; else null"
    )
    memo: str | None
    created_at: str


class Transfer(Schema):
    """``GET /api/transfers/{id}``: one leg, or every leg of an envelope the reader may
    see."""

    id: str
    transfers: list[TransferLeg]


class UsageDay(Schema):
    day: str = Field(description="a UTC day, YYYY-MM-DD")
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost: int = Field(description="CU")


class AccountUsage(Schema):
    """``GET /api/accounts/{address}/usage``: model spend by UTC day and model."""

    address: str
    since: str
    until: str
    items: list[UsageDay]
    total_cost: int
