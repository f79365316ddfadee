"""A member's API key as a reader: the principal of a key (see :mod:`ubc.auth`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ubc.auth import Principal, hash_secret
from ubc.db import table
from ubc.errors import Forbidden, Unauthenticated
from ubc.members.models import ApiKey, Member

apikeys_t = table(ApiKey)
members_t = table(Member)


def api_key_principal(session: Session, secret: str, *, now: datetime) -> Principal:
    """The principal of a member's API key; 401 when unknown, revoked or expired."""
    digest = hash_secret(secret)
    row = session.execute(
        select(
            apikeys_t.c.account, apikeys_t.c.scopes, apikeys_t.c.revoked, apikeys_t.c.expires_at
        ).where(apikeys_t.c.key_hash == digest)
    ).first()
    if row is None or row.revoked:
        raise Unauthenticated("unknown or revoked API key")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthenticated("this API key has expired")
    account: str = row.account
    if account.startswith("member:"):
        status = session.execute(
            select(members_t.c.status).where(members_t.c.handle == account[7:])
        ).scalar_one_or_none()
        if status != "active":
            raise Forbidden(f"{account} is {status or 'unknown'}: its API keys are disabled")
    return Principal(
        "member", account=account, key_hash=digest, scopes=frozenset(row.scopes.split(","))
    )
