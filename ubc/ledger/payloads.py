"""Payload schemas of the ledger's own types: its configuration and moving value."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ubc.rules.payload import (
    MAX_AMOUNT,
    Address,
    Amount,
    AssetCode,
    ExternalRef,
    Memo,
    Payload,
    PublicKey,
)


class AssetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    scale: Annotated[int, Field(ge=0, le=18)]


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    input: Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
    output: Annotated[int, Field(ge=0, le=MAX_AMOUNT)]


class LedgerGenesis(Payload):
    """The ledger's configuration, journal entry 0 (ledger key)."""

    ledger_public_key: PublicKey
    operator_public_keys: Annotated[list[PublicKey], Field(min_length=1, max_length=8)]
    enrollment: Literal["invite", "open"]
    assets: dict[AssetCode, AssetSpec]
    market_fee_bps: Annotated[int, Field(ge=0, le=10_000)]
    models: dict[str, ModelPrice]
    cu_price_usd: Annotated[str, StringConstraints(pattern=r"^\d{1,12}(\.\d{1,12})?$")]


class LedgerConfig(LedgerGenesis):
    """A change of configuration (ledger key and an operator key)."""


class TransferPayload(Payload):
    from_: Address = Field(alias="from")
    to: Address
    asset: AssetCode
    amount: Amount
    memo: Memo | None = None

    human_text = ("memo",)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)


class Deposit(Payload):
    to: Address
    asset: AssetCode
    amount: Amount
    external_ref: ExternalRef

    human_text = ("external_ref",)


class Withdrawal(Payload):
    from_: Address = Field(alias="from")
    asset: AssetCode
    amount: Amount
    external_ref: ExternalRef

    human_text = ("external_ref",)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)
