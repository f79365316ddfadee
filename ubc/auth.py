"""Bearer authentication for reads: operator and auditor tokens, and members' API keys."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ubc.errors import Forbidden, Unauthenticated
from ubc.members.models import ApiKey, Member

apikeys_t = ApiKey.__table__  # type: ignore[attr-defined]
members_t = Member.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is reading: ``operator``, ``auditor``, or the account of an API key."""

    role: str
    account: str | None = None
    key_hash: str | None = None
    scopes: frozenset[str] = frozenset()

    @property
    def sees_everything(self) -> bool:
        return self.role in ("operator", "auditor")

    def may_read(self, address: str) -> bool:
        return self.sees_everything or (self.account == address and "read" in self.scopes)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def authenticate_bearer(
    session: Session,
    authorization: str | None,
    *,
    tokens: dict[str, str],
    now: datetime,
) -> Principal:
    """The principal of an ``Authorization: Bearer ...`` header (tokens: role → token)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthenticated("a bearer token or API key is required")
    secret = authorization[7:].strip()
    for role, token in tokens.items():
        if token and hmac.compare_digest(secret.encode(), token.encode()):
            return Principal(role)
    return api_key_principal(session, secret, now=now)


def api_key_principal(session: Session, secret: str, *, now: datetime) -> Principal:
    """The principal of a member's API key; 401 when unknown, revoked or expired."""
    digest = hash_secret(secret)
    row = session.execute(
        select(
            apikeys_t.c.account, apikeys_t.c.scopes, apikeys_t.c.revoked, apikeys_t.c.expires_at
        ).where(apikeys_t.c.key_hash == digest)
    ).first()
    if row is None or row[2]:
        raise Unauthenticated("unknown or revoked API key")
    if row[3] is not None and row[3] <= now:
        raise Unauthenticated("this API key has expired")
    account: str = row[0]
    if account.startswith("member:"):
        status = session.execute(
            select(members_t.c.status).where(members_t.c.handle == account[7:])
        ).scalar_one_or_none()
        if status != "active":
            raise Forbidden(f"{account} is {status or 'unknown'}: its API keys are disabled")
    return Principal(
        "member", account=account, key_hash=digest, scopes=frozenset(row[1].split(","))
    )
