"""HTTP reads of members."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from ubc.db import table
from ubc.deps import Reader, ReadSession, require_read
from ubc.errors import NotFound
from ubc.members.models import Member, MemberKey
from ubc.members.schemas import Member as MemberBody
from ubc.schemas import error_responses

router = APIRouter(tags=["members"])
members_t = table(Member)
keys_t = table(MemberKey)


@router.get(
    "/api/members/{handle}",
    summary="A member: status, tier and keys",
    response_model=MemberBody,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 404),
)
def get_member(handle: str, session: ReadSession, reader: Reader) -> dict[str, Any]:
    require_read(reader, f"member:{handle}")
    row = session.execute(
        select(
            members_t.c.status, members_t.c.tier, members_t.c.display_name, members_t.c.created_at
        ).where(members_t.c.handle == handle)
    ).first()
    if row is None:
        raise NotFound(f"no member {handle}", detail={"handle": handle})
    keys = session.execute(
        select(keys_t.c.keyid, keys_t.c.public_key, keys_t.c.current)
        .where(keys_t.c.handle == handle)
        .order_by(keys_t.c.created_at)
    ).all()
    return {
        "handle": handle,
        "address": f"member:{handle}",
        "status": row.status,
        "tier": row.tier,
        "display_name": row.display_name,
        "created_at": row.created_at.isoformat(),
        "keys": [
            {"keyid": k.keyid, "public_key": k.public_key, "current": k.current} for k in keys
        ],
    }
