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

from ubc.deps import Reader, ReadSession, require_read
from ubc.gateway.models import ApiKeySpend, UsageRecord
from ubc.members.models import ApiKey
from ubc.members.schemas import ApiKeyList
from ubc.schemas import error_responses

__all__ = ["list_api_keys", "router"]

router = APIRouter(tags=["members"])
apikeys_t = ApiKey.__table__  # type: ignore[attr-defined]
usage_t = UsageRecord.__table__  # type: ignore[attr-defined]
spend_t = ApiKeySpend.__table__  # type: ignore[attr-defined]


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
    hashes = [g[0] for g in grants]
    spend = {
        r[0]: (int(r[1]), int(r[2] or 0))
        for r in session.execute(
            select(usage_t.c.key_hash, func.count(), func.sum(usage_t.c.cost))
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
        r[0]: (int(r[1]), int(r[2]))
        for r in session.execute(
            select(spend_t.c.key_hash, spend_t.c.epoch, spend_t.c.spent).join(
                latest,
                (latest.c.key_hash == spend_t.c.key_hash) & (latest.c.epoch == spend_t.c.epoch),
            )
        )
    }
    items = []
    for g in grants:
        calls, spent = spend.get(g[0], (0, 0))
        epoch, spent_in_epoch = epoch_spend.get(g[0], (None, 0))
        items.append(
            {
                "key_hash": g[0],
                "label": g[1],
                "scopes": g[2].split(","),
                "spend_cap_per_epoch": g[3],
                "models": json.loads(g[4]) if g[4] is not None else None,
                "expires_at": g[5].isoformat() if g[5] is not None else None,
                "rpm": g[6],
                "tpm": g[7],
                "granted_by": g[8],
                "revoked": bool(g[9]),
                "created_at": g[10].isoformat(),
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
