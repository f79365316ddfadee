"""What the members' read routes answer (``ubc/members/routes.py`` and
``ubc/apikey_routes.py``). Pure pydantic, for ``response_model=``."""

from __future__ import annotations

from pydantic import Field

from ubc.schemas import Schema

__all__ = ["ApiKeyInfo", "ApiKeyList", "Member", "MemberKey"]


class MemberKey(Schema):
    keyid: str
    public_key: str = Field(description="standard base64 of the 32-byte Ed25519 key")
    current: bool


class Member(Schema):
    """``GET /api/members/{handle}``."""

    handle: str
    address: str
    status: str = Field(description="pending, active or suspended")
    tier: str | None
    display_name: str | None
    created_at: str
    keys: list[MemberKey] = Field(description="oldest first; one is current")


class ApiKeyInfo(Schema):
    """An API key granted on an account (its hash, never its secret) and what it spent:
    ``calls`` and ``spent`` in all, ``spent_in_epoch`` in ``epoch`` (the latest)."""

    key_hash: str
    label: str
    scopes: list[str]
    spend_cap_per_epoch: int | None
    models: list[str] | None
    expires_at: str | None
    rpm: int | None
    tpm: int | None
    granted_by: str
    revoked: bool
    created_at: str
    calls: int
    spent: int
    epoch: int | None
    spent_in_epoch: int


class ApiKeyList(Schema):
    """``GET /api/accounts/{address}/apikeys``: oldest first."""

    address: str
    apikeys: list[ApiKeyInfo]
