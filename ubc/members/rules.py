"""Rules of members: registration, key rotation, API-key grants, admission and tiers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from ubc.errors import BadRequest, Conflict, Forbidden, MissingSignature, NotFound, StateConflict
from ubc.members.payloads import (
    ApiKeyGrant,
    ApiKeyRevoke,
    KeyRotate,
    MemberAdmit,
    MemberRegister,
    MemberUpdate,
)
from ubc.rules import (
    Change,
    Lookup,
    Plan,
    RuleContext,
    RuleSpec,
    Signers,
    active_member,
    member_signer,
    require_operator,
    require_own_account,
    require_status,
)
from ubc.rules.payload import parse_timestamp
from ubc.signing import decode_public_key, key_id


class MembersLookup(Lookup, Protocol):
    def grant_exists(self, key_hash: str) -> bool:
        """Whether an API key with this hash was ever granted."""
        ...

    def grant_revoked(self, key_hash: str, account: str) -> bool | None:
        """Whether the key granted on ``account`` is revoked; None if there is none."""
        ...


@dataclass(frozen=True, slots=True)
class MemberCreated(Change):
    """A member, its first key, and its accounts in every asset of the ledger."""

    handle: str
    status: str
    display_name: str | None
    keyid: str
    public_key: str
    assets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KeyRotated(Change):
    """The member's current key retired, ``keyid`` current from now on."""

    handle: str
    keyid: str
    public_key: str


@dataclass(frozen=True, slots=True)
class MemberStatusSet(Change):
    handle: str
    status: str
    tier: str | None


@dataclass(frozen=True, slots=True)
class GrantStored(Change):
    """An API key granted on ``account`` (scopes sorted, comma-joined)."""

    key_hash: str
    account: str
    label: str
    scopes: str
    spend_cap_per_epoch: int | None
    models: tuple[str, ...] | None
    expires_at: datetime | None
    rpm: int | None
    tpm: int | None
    granted_by: str


@dataclass(frozen=True, slots=True)
class GrantRevoked(Change):
    key_hash: str


def register(
    look: MembersLookup, ctx: RuleContext, payload: MemberRegister, signers: Signers
) -> Plan:
    public = decode_public_key(payload.public_key)
    if public not in signers.payload_keys:
        raise MissingSignature("member.register must be signed by the key it registers")
    if payload.actor != f"member:{payload.handle}":
        raise Forbidden(f"actor must be member:{payload.handle}")
    if look.member(payload.handle) is not None:
        raise Conflict(f"handle {payload.handle} is taken", detail={"handle": payload.handle})
    keyid = key_id(public)
    if look.key(keyid) is not None:
        raise Conflict("this public key is already registered", detail={"keyid": keyid})
    status = "active" if ctx.enrollment == "open" else "pending"
    created = MemberCreated(
        payload.handle, status, payload.display_name, keyid, payload.public_key, ctx.assets
    )
    return Plan(accounts=frozenset({f"member:{payload.handle}"}), changes=(created,))


def rotate(look: MembersLookup, ctx: RuleContext, payload: KeyRotate, signers: Signers) -> Plan:
    if payload.actor != f"member:{payload.handle}":
        raise Forbidden(f"actor must be member:{payload.handle}")
    handle = member_signer(payload.actor, signers)
    require_status(look, handle, allow_pending=True)
    new = decode_public_key(payload.new_public_key)
    if new not in signers.payload_keys:
        raise MissingSignature(
            "key.rotate must be signed by the new key as well as the current one"
        )
    new_id = key_id(new)
    if look.key(new_id) is not None:
        raise Conflict("the new key is already registered", detail={"keyid": new_id})
    return Plan(
        accounts=frozenset({payload.actor}),
        changes=(KeyRotated(handle, new_id, payload.new_public_key),),
    )


def grant(look: MembersLookup, ctx: RuleContext, payload: ApiKeyGrant, signers: Signers) -> Plan:
    handle = active_member(look, payload.actor, signers)
    require_own_account(look, payload.account, handle)
    if look.grant_exists(payload.key_hash):
        raise Conflict("an API key with this hash is already granted")
    expires = parse_timestamp(payload.expires_at) if payload.expires_at else None
    if expires is not None and expires <= ctx.now:
        raise BadRequest("expires_at is in the past")
    stored = GrantStored(
        key_hash=payload.key_hash,
        account=payload.account,
        label=payload.label,
        scopes=",".join(sorted(set(payload.scopes))),
        spend_cap_per_epoch=payload.spend_cap_per_epoch,
        models=tuple(payload.models) if payload.models is not None else None,
        expires_at=expires,
        rpm=payload.rpm,
        tpm=payload.tpm,
        granted_by=payload.actor,
    )
    return Plan(accounts=frozenset({payload.account}), changes=(stored,))


def revoke(look: MembersLookup, ctx: RuleContext, payload: ApiKeyRevoke, signers: Signers) -> Plan:
    handle = active_member(look, payload.actor, signers)
    require_own_account(look, payload.account, handle)
    revoked = look.grant_revoked(payload.key_hash, payload.account)
    if revoked is None:
        raise NotFound("no such API key on this account", detail={"key_hash": payload.key_hash})
    if revoked:
        raise StateConflict("this API key is already revoked")
    return Plan(accounts=frozenset({payload.account}), changes=(GrantRevoked(payload.key_hash),))


def admit(look: MembersLookup, ctx: RuleContext, payload: MemberAdmit, signers: Signers) -> Plan:
    require_operator(payload, signers)
    member = look.member(payload.handle)
    if member is None:
        raise NotFound(f"no member {payload.handle}", detail={"handle": payload.handle})
    if member.status != "pending":
        raise StateConflict(f"member {payload.handle} is already admitted ({member.status})")
    return Plan(
        accounts=frozenset({f"member:{payload.handle}"}),
        changes=(MemberStatusSet(payload.handle, "active", payload.tier),),
    )


def update(look: MembersLookup, ctx: RuleContext, payload: MemberUpdate, signers: Signers) -> Plan:
    require_operator(payload, signers)
    member = look.member(payload.handle)
    if member is None:
        raise NotFound(f"no member {payload.handle}", detail={"handle": payload.handle})
    if payload.tier is None and payload.status is None:
        raise BadRequest("member.update needs a tier or a status")
    if payload.status is not None and member.status == "pending":
        raise StateConflict(f"member {payload.handle} is not admitted yet: use member.admit")
    status = MemberStatusSet(
        payload.handle,
        payload.status or member.status,
        payload.tier if payload.tier is not None else member.tier,
    )
    return Plan(accounts=frozenset({f"member:{payload.handle}"}), changes=(status,))


RULES = (
    RuleSpec("member.register", MemberRegister, register),
    RuleSpec("key.rotate", KeyRotate, rotate),
    RuleSpec("apikey.grant", ApiKeyGrant, grant),
    RuleSpec("apikey.revoke", ApiKeyRevoke, revoke),
    RuleSpec("member.admit", MemberAdmit, admit),
    RuleSpec("member.update", MemberUpdate, update),
)
