"""Payload schemas of every envelope type (DESIGN section 4, a public contract).

Each payload is a strict JSON object: unknown fields, wrong types and floats are refused.
Amounts are integers 1 ≤ amount ≤ 2^53−1; addresses are always full (``member:alice``).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

MAX_PAYLOAD_BYTES = 8 * 1024
MAX_AMOUNT = 2**53 - 1

HANDLE_PATTERN = r"^[a-z0-9_-]{3,32}$"
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{1,63}$"
ADDRESS_PATTERN = r"^(member:[a-z0-9_-]{3,32}|cause:[a-z0-9][a-z0-9-]{1,63})$"
ACTOR_PATTERN = r"^(member:[a-z0-9_-]{3,32}|operator|ledger)$"
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


def _uuid(value: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError("must be a UUID") from None
    if str(parsed) != value:
        raise ValueError("must be a UUID in lowercase hyphenated form")
    return value


def _timestamp(value: str) -> str:
    if not _RFC3339_UTC.match(value):
        raise ValueError("must be an RFC 3339 UTC timestamp like 2026-01-31T12:00:00Z")
    parse_timestamp(value)
    return value


def parse_timestamp(value: str) -> datetime:
    """The aware datetime of an RFC 3339 UTC timestamp (beyond microseconds truncated)."""
    # The pattern was checked by the schema; fromisoformat (3.11) reads "Z" and any fraction.
    return datetime.fromisoformat(value)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, as ubc writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Uuid = Annotated[str, AfterValidator(_uuid)]
Timestamp = Annotated[str, AfterValidator(_timestamp)]
Handle = Annotated[str, StringConstraints(pattern=HANDLE_PATTERN)]
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN)]
Address = Annotated[str, StringConstraints(pattern=ADDRESS_PATTERN)]
AssetCode = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9]{1,15}$")]
Amount = Annotated[int, Field(ge=1, le=MAX_AMOUNT)]
PublicKey = Annotated[str, StringConstraints(min_length=44, max_length=44)]
KeyHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Memo = Annotated[str, StringConstraints(max_length=256)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(max_length=2000)]
ExternalRef = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Payload(BaseModel):
    """Fields every payload carries."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ledger: str = Field(description="the ledger origin; stops cross-ledger replay")
    id: Uuid = Field(description="UUID chosen by the signer: the idempotency key")
    created_at: Timestamp = Field(description="RFC 3339 UTC, checked against a skew window")
    actor: Annotated[str, StringConstraints(pattern=ACTOR_PATTERN)] = Field(
        description="the signer's address: member:<handle>, operator or ledger"
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


class MemberRegister(Payload):
    handle: Handle
    public_key: PublicKey
    display_name: Annotated[str, StringConstraints(max_length=80)] | None = None


class KeyRotate(Payload):
    handle: Handle
    new_public_key: PublicKey


class ApiKeyGrant(Payload):
    account: Address
    key_hash: KeyHash
    label: Label
    scopes: Annotated[list[Literal["models", "read"]], Field(min_length=1, max_length=2)]
    spend_cap_per_epoch: Amount | None = None
    models: (
        Annotated[list[Annotated[str, StringConstraints(max_length=128)]], Field(max_length=64)]
        | None
    ) = None
    expires_at: Timestamp | None = None
    rpm: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    tpm: Annotated[int, Field(ge=1, le=MAX_AMOUNT)] | None = None


class ApiKeyRevoke(Payload):
    account: Address
    key_hash: KeyHash


class TransferPayload(Payload):
    from_: Address = Field(alias="from")
    to: Address
    asset: AssetCode
    amount: Amount
    memo: Memo | None = None

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)


class MemberAdmit(Payload):
    handle: Handle
    tier: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]


class MemberUpdate(Payload):
    handle: Handle
    tier: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")] | None = None
    status: Literal["active", "suspended"] | None = None
    reason: Memo | None = None


class Deposit(Payload):
    to: Address
    asset: AssetCode
    amount: Amount
    external_ref: ExternalRef


class Withdrawal(Payload):
    from_: Address = Field(alias="from")
    asset: AssetCode
    amount: Amount
    external_ref: ExternalRef

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)


Tier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]


class EpochOpen(Payload):
    """Allocate each active member of a listed tier its amount from ``system:issuance``."""

    epoch: Annotated[int, Field(ge=1, le=MAX_AMOUNT)]
    asset: AssetCode
    allocations: Annotated[dict[Tier, Amount], Field(min_length=1, max_length=64)]
    carryover_cap: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] | None = None
    starts_at: Timestamp
    ends_at: Timestamp


class EpochClose(Payload):
    """Expire what each member can still spend above the epoch's carryover cap."""

    epoch: Annotated[int, Field(ge=1, le=MAX_AMOUNT)]


ModelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")]
Count = Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
# A gateway hold is the only leg of the ledger request ``hold:<call id>``.
_UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
HoldId = Annotated[str, StringConstraints(pattern=rf"^hold:{_UUID_RE}:0$")]


class Usage(Payload):
    """One metered model call (ledger key): posts the call's hold for ``cost``."""

    account: Address
    key_hash: KeyHash
    request_id: Uuid
    model: ModelId
    input_tokens: Count
    output_tokens: Count
    held: Amount
    cost: Count


class HoldExpire(Payload):
    """A gateway hold that timed out unbilled (ledger key): released, nothing posted."""

    hold_id: HoldId


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


class CauseRegister(Payload):
    slug: Slug
    name: Annotated[str, StringConstraints(min_length=1, max_length=80)]
    description: Text
    stewards: Annotated[list[Handle], Field(min_length=1, max_length=16)]


class CauseUpdate(CauseRegister):
    pass


PAYLOAD_MODELS: dict[str, type[Payload]] = {
    "ledger.genesis": LedgerGenesis,
    "ledger.config": LedgerConfig,
    "member.register": MemberRegister,
    "key.rotate": KeyRotate,
    "apikey.grant": ApiKeyGrant,
    "apikey.revoke": ApiKeyRevoke,
    "transfer": TransferPayload,
    "member.admit": MemberAdmit,
    "member.update": MemberUpdate,
    "deposit": Deposit,
    "withdrawal": Withdrawal,
    "epoch.open": EpochOpen,
    "epoch.close": EpochClose,
    "usage": Usage,
    "hold.expire": HoldExpire,
    "offer.create": OfferCreate,
    "offer.fill": OfferFill,
    "offer.cancel": OfferCancel,
    "offer.expire": OfferExpire,
    "cause.register": CauseRegister,
    "cause.update": CauseUpdate,
}


def validate_payload(type_name: str, body: dict[str, Any]) -> Payload:
    """Validate a parsed payload against its type's schema; ValueError with a clear message."""
    model = PAYLOAD_MODELS.get(type_name)
    if model is None:
        raise ValueError(f"unknown payload type {type_name!r}")
    try:
        return model.model_validate(body, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None


def payload_json(payload: Payload) -> dict[str, Any]:
    """The JSON object of ``payload`` with wire names, leaving out unset optional fields."""
    return payload.model_dump(by_alias=True, exclude_none=True)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "payload"
        kind = error["type"]
        if kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif kind == "missing":
            parts.append(f"missing field {where!r}")
        else:
            parts.append(f"field {where!r}: {error['msg']}")
    return "; ".join(parts)
