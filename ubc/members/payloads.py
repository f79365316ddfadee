"""Payload schemas of members: registration, keys, API-key grants, admission, tiers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from ubc.rules.payload import (
    MAX_AMOUNT,
    Address,
    Amount,
    Handle,
    KeyHash,
    Label,
    Memo,
    Payload,
    PublicKey,
    Timestamp,
)

Tier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]


class MemberRegister(Payload):
    handle: Handle
    public_key: PublicKey
    display_name: Annotated[str, StringConstraints(max_length=80)] | None = None

    human_text = ("display_name",)


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

    human_text = ("label", "models")


class ApiKeyRevoke(Payload):
    account: Address
    key_hash: KeyHash


class MemberAdmit(Payload):
    handle: Handle
    tier: Tier


class MemberUpdate(Payload):
    handle: Handle
    tier: Tier | None = None
    status: Literal["active", "suspended"] | None = None
    reason: Memo | None = None

    human_text = ("reason",)
