"""Who signed an envelope, and the checks rules make of it."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from ubc.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from ubc.rules.lookup import KeyInfo, Lookup
from ubc.rules.payload import Payload
from ubc.signing import Envelope, decode_public_key, key_id, verified_keyids


@dataclass(frozen=True, slots=True)
class Signers:
    """Whose signatures verified on an envelope."""

    operator: bool = False
    ledger: bool = False
    current: frozenset[str] = frozenset()  # handles whose current key signed
    rotated: frozenset[str] = frozenset()  # handles whose old key signed
    payload_keys: frozenset[bytes] = frozenset()  # keys named in the payload that signed


def authenticate(
    look: Lookup,
    envelope: Envelope,
    payload: Payload,
    *,
    operator_keys: Mapping[str, bytes],
    ledger_public_key: bytes,
    preverified: frozenset[str] = frozenset(),
) -> Signers:
    """Verify the signatures against every key the ledger knows (and keys the payload
    introduces); Unauthenticated when none verifies.

    ``preverified`` are keyids whose signatures were already checked against the same
    public keys outside the transaction (keys never change their bytes, only whether
    they are current), so only the others are verified here.
    """
    ledger_keyid = _key_id(ledger_public_key)
    payload_keys: dict[str, bytes] = {}
    fields = payload.__dict__  # a model's field values (no attribute fallback lookups)
    for name in ("public_key", "new_public_key"):
        value = fields.get(name)
        if isinstance(value, str):
            try:
                public = decode_public_key(value)
            except ValueError as exc:
                raise BadRequest(f"field {name!r}: {exc}") from None
            payload_keys.setdefault(key_id(public), public)
    # The key each signature names, where the ledger knows one: its own, an operator's, a
    # key the payload introduces, or a member's (current or rotated away).
    known: dict[str, bytes] = {}
    members: dict[str, KeyInfo] = {}
    for signature in envelope.signatures:
        keyid = signature.keyid
        if keyid == ledger_keyid:
            known[keyid] = ledger_public_key
        elif keyid in operator_keys:
            known[keyid] = operator_keys[keyid]
        elif keyid in payload_keys:
            known[keyid] = payload_keys[keyid]
        else:
            info = look.key(keyid)
            if info is not None:
                known[keyid] = info.public_key
                members[keyid] = info
    unchecked = {k: v for k, v in known.items() if k not in preverified}
    verified = {k for k in known if k in preverified}
    if unchecked:
        verified |= verified_keyids(envelope, unchecked)
    if not verified:
        raise Unauthenticated(
            "no signature verifies under a key this ledger knows",
            detail={"keyids": [s.keyid for s in envelope.signatures]},
        )
    current: set[str] = set()
    rotated: set[str] = set()
    for keyid in verified:
        if keyid == ledger_keyid or keyid in operator_keys:
            continue
        info = members.get(keyid) or look.key(keyid)
        if info is not None:
            (current if info.current else rotated).add(info.handle)
    return Signers(
        operator=any(k in operator_keys for k in verified),
        ledger=ledger_keyid in verified,
        current=frozenset(current),
        rotated=frozenset(rotated),
        payload_keys=frozenset(p for k, p in payload_keys.items() if k in verified),
    )


@functools.lru_cache(maxsize=64)
def _key_id(public_key: bytes) -> str:
    return key_id(public_key)


def actor_handle(actor: str) -> str | None:
    return actor.removeprefix("member:") if actor.startswith("member:") else None


def require_operator(payload: Payload, signers: Signers) -> None:
    if not signers.operator:
        raise Forbidden("only the operator may sign this payload type")
    if payload.actor != "operator":
        raise Forbidden("actor must be operator")


def require_ledger(payload: Payload, signers: Signers) -> None:
    if not signers.ledger or payload.actor != "ledger":
        raise Forbidden("only the ledger itself signs this payload type (actor ledger)")


def member_signer(actor: str, signers: Signers) -> str:
    """The handle of ``actor`` if its current key signed; Forbidden otherwise."""
    handle = actor_handle(actor)
    if handle is None:
        raise Forbidden("this payload must be signed by a member")
    if handle in signers.current:
        return handle
    if handle in signers.rotated:
        raise Forbidden(
            f"the key that signed was rotated away from member:{handle}",
            detail={"actor": actor},
        )
    raise Forbidden(f"the signer may not act for {actor}", detail={"actor": actor})


def active_member(look: Lookup, actor: str, signers: Signers) -> str:
    """The handle of an admitted, unsuspended member whose current key signed."""
    handle = member_signer(actor, signers)
    require_status(look, handle)
    return handle


def require_status(look: Lookup, handle: str, *, allow_pending: bool = False) -> None:
    member = look.member(handle)
    if member is None:
        raise NotFound(f"no member {handle}", detail={"handle": handle})
    if member.status == "suspended":
        raise Forbidden(f"member {handle} is suspended", detail={"handle": handle})
    if member.status == "pending" and not allow_pending:
        raise Forbidden(f"member {handle} is not admitted yet", detail={"handle": handle})


def require_steward(look: Lookup, account: str, handle: str) -> None:
    """Forbidden unless ``member:handle`` is a steward of the cause ``account``; NotFound
    for a cause that is not registered."""
    slug = account.removeprefix("cause:")
    stewards = look.stewards(account) if account.startswith("cause:") else None
    if stewards is None:
        raise NotFound(f"no cause {slug}", detail={"account": account})
    if handle not in stewards:
        raise Forbidden(
            f"member:{handle} is not a steward of {account}: only its stewards act for it",
            detail={"account": account},
        )


def require_own_account(look: Lookup, account: str, handle: str) -> None:
    """The member acts for its own account, or for a cause it is a steward of."""
    if account == f"member:{handle}":
        return
    if account.startswith("cause:"):
        require_steward(look, account, handle)
        return
    raise Forbidden(f"member:{handle} may not act for {account}", detail={"account": account})
