"""What the causes' read routes answer (``ubc/causes/routes.py``). Pure pydantic, for
``response_model=``."""

from __future__ import annotations

from pydantic import Field

from ubc.schemas import Schema

__all__ = ["Cause", "CauseList", "DonationPage", "DonationReceipt"]


class Cause(Schema):
    """A cause: stewards, balances, and per asset what it received and spent."""

    slug: str
    address: str
    name: str
    description: str
    stewards: list[str] = Field(description="handles of its steward members")
    created_at: str
    updated_at: str
    balances: dict[str, int] = Field(description="available amount per asset")
    donated: dict[str, int] = Field(description="donations received per asset")
    donors: int = Field(description="distinct donor accounts")
    spent: dict[str, int] = Field(description="used_on_models + sent, per asset")
    used_on_models: dict[str, int]
    sent: dict[str, int]


class CauseList(Schema):
    """``GET /api/causes``: by slug."""

    causes: list[Cause]


class DonationReceipt(Schema):
    """One donation of an account, with the journal entry that proves it."""

    id: str = Field(description="the envelope's id")
    transfer_id: str
    seq: int | None = Field(description="the journal entry")
    cause: str
    asset: str
    amount: int
    memo: str | None
    created_at: str


class DonationPage(Schema):
    """``GET /api/accounts/{address}/donations``: newest first."""

    address: str
    donations: list[DonationReceipt]
    next_cursor: str | None = Field(description="null on the last page")
