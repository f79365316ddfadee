"""A member's API key as a reader: the principal of a key (see :mod:`ubc.auth`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ubc.auth import Principal, hash_secret
from ubc.errors import Forbidden, Unauthenticated
from ubc.members.models import ApiKey, Member

apikeys_t = ApiKey.__table__  # type: ignore[attr-defined]
members_t = Member.__table__  # type: ignore[attr-defined]


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
