"""Reads and writes of the members' tables, for the write path (rules never write)."""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from ubc.db import table
from ubc.ledger import service as ledger
from ubc.members.models import ApiKey, ExternalRef, Member, MemberKey
from ubc.members.rules import GrantRevoked, GrantStored, KeyRotated, MemberCreated, MemberStatusSet

members_t = table(Member)
keys_t = table(MemberKey)
apikeys_t = table(ApiKey)
refs_t = table(ExternalRef)


def create_member(session: Session, change: MemberCreated, now: datetime) -> None:
    session.execute(
        insert(members_t).values(
            handle=change.handle,
            status=change.status,
            tier=None,
            display_name=change.display_name,
            created_at=now,
        )
    )
    session.execute(
        insert(keys_t).values(
            keyid=change.keyid,
            handle=change.handle,
            public_key=change.public_key,
            current=True,
            created_at=now,
        )
    )
    ledger.open_accounts(session, [(f"member:{change.handle}", a) for a in change.assets], now=now)


def rotate_key(session: Session, change: KeyRotated, now: datetime) -> None:
    session.execute(
        update(keys_t)
        .where(keys_t.c.handle == change.handle, keys_t.c.current)
        .values(current=False)
    )
    session.execute(
        insert(keys_t).values(
            keyid=change.keyid,
            handle=change.handle,
            public_key=change.public_key,
            current=True,
            created_at=now,
        )
    )


def set_status(session: Session, change: MemberStatusSet, now: datetime) -> None:
    session.execute(
        update(members_t)
        .where(members_t.c.handle == change.handle)
        .values(status=change.status, tier=change.tier)
    )


def store_grant(session: Session, change: GrantStored, now: datetime) -> None:
    session.execute(
        insert(apikeys_t).values(
            key_hash=change.key_hash,
            account=change.account,
            label=change.label,
            scopes=change.scopes,
            spend_cap_per_epoch=change.spend_cap_per_epoch,
            models=json.dumps(list(change.models)) if change.models is not None else None,
            expires_at=change.expires_at,
            rpm=change.rpm,
            tpm=change.tpm,
            granted_by=change.granted_by,
            revoked=False,
            created_at=now,
        )
    )


def revoke_grant(session: Session, change: GrantRevoked, now: datetime) -> None:
    session.execute(
        update(apikeys_t).where(apikeys_t.c.key_hash == change.key_hash).values(revoked=True)
    )


def grant_exists(session: Session, key_hash: str) -> bool:
    row = session.execute(
        select(apikeys_t.c.key_hash).where(apikeys_t.c.key_hash == key_hash)
    ).first()
    return row is not None


def grant_revoked(session: Session, key_hash: str, account: str) -> bool | None:
    row = session.execute(
        select(apikeys_t.c.revoked).where(
            apikeys_t.c.key_hash == key_hash, apikeys_t.c.account == account
        )
    ).first()
    return None if row is None else bool(row.revoked)


def external_ref_user(session: Session, ref: str) -> str | None:
    """The envelope that used a deposit's or withdrawal's external reference."""
    row = session.execute(select(refs_t.c.envelope_id).where(refs_t.c.ref == ref)).first()
    return None if row is None else str(row.envelope_id)


def store_ref(session: Session, ref: str, envelope_id: str) -> None:
    session.execute(insert(refs_t).values(ref=ref, envelope_id=envelope_id))
