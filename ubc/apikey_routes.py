"""``GET /api/accounts/{address}/apikeys``: the API keys granted on an account and what
each one spent (``ubc apikey list``).

Only hashes are kept, never secrets; a key is listed with its grant (label, scopes,
limits), whether it is revoked, and its spend from the usage records the journaled
``usage`` entries left: in all, and in the epoch its spend cap counts (the latest).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from sqlalchemy import func, select

from ubc.db import table
from ubc.deps import Reader, ReadSession, require_read
from ubc.gateway.models import ApiKeySpend, UsageRecord
from ubc.members.models import ApiKey
from ubc.members.schemas import ApiKeyList
from ubc.schemas import error_responses

__all__ = ["list_api_keys", "router"]

router = APIRouter(tags=["members"])
apikeys_t = table(ApiKey)
usage_t = table(UsageRecord)
spend_t = table(ApiKeySpend)


def list_api_keys(session: Any, address: str) -> list[dict[str, Any]]:
    """Every grant on ``address``, oldest first, with its calls and spend."""
    grants = session.execute(
        select(
            apikeys_t.c.key_hash,
            apikeys_t.c.label,
            apikeys_t.c.scopes,
            apikeys_t.c.spend_cap_per_epoch,
            apikeys_t.c.models,
            apikeys_t.c.expires_at,
            apikeys_t.c.rpm,
            apikeys_t.c.tpm,
            apikeys_t.c.granted_by,
            apikeys_t.c.revoked,
            apikeys_t.c.created_at,
        )
        .where(apikeys_t.c.account == address)
        .order_by(apikeys_t.c.created_at, apikeys_t.c.key_hash)
    ).all()
    if not grants:
        return []
    hashes = [g.key_hash for g in grants]
    spend = {
        r.key_hash: (int(r.calls), int(r.spent or 0))
        for r in session.execute(
            select(
                usage_t.c.key_hash,
                func.count().label("calls"),
                func.sum(usage_t.c.cost).label("spent"),
            )
            .where(usage_t.c.account == address, usage_t.c.key_hash.in_(hashes))
            .group_by(usage_t.c.key_hash)
        )
    }
    latest = (
        select(spend_t.c.key_hash, func.max(spend_t.c.epoch).label("epoch"))
        .where(spend_t.c.key_hash.in_(hashes))
        .group_by(spend_t.c.key_hash)
        .subquery()
    )
    epoch_spend = {
        r.key_hash: (int(r.epoch), int(r.spent))
        for r in session.execute(
            select(spend_t.c.key_hash, spend_t.c.epoch, spend_t.c.spent).join(
                latest,
                (latest.c.key_hash == spend_t.c.key_hash) & (latest.c.epoch == spend_t.c.epoch),
            )
        )
    }
    items = []
    for g in grants:
        calls, spent = spend.get(g.key_hash, (0, 0))
        epoch, spent_in_epoch = epoch_spend.get(g.key_hash, (None, 0))
        items.append(
            {
                "key_hash": g.key_hash,
                "label": g.label,
                "scopes": g.scopes.split(","),
                "spend_cap_per_epoch": g.spend_cap_per_epoch,
                "models": json.loads(g.models) if g.models is not None else None,
                "expires_at": g.expires_at.isoformat() if g.expires_at is not None else None,
                "rpm": g.rpm,
                "tpm": g.tpm,
                "granted_by": g.granted_by,
                "revoked": bool(g.revoked),
                "created_at": g.created_at.isoformat(),
                "calls": calls,
                "spent": spent,
                "epoch": epoch,
                "spent_in_epoch": spent_in_epoch,
            }
        )
    return items


@router.get(
    "/api/accounts/{address}/apikeys",
    summary="API keys granted on an account (hashes only), with what each spent",
    response_model=ApiKeyList,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403),
)
def get_api_keys(address: str, session: ReadSession, reader: Reader) -> dict[str, Any]:
    require_read(reader, address)
    return {"address": address, "apikeys": list_api_keys(session, address)}
