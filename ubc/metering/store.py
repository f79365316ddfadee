"""Reads and writes of the metering tables, for the write path (rules never write)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, literal_column, select, update
from sqlalchemy.orm import Session

from ubc.db import table
from ubc.members.models import ApiKey
from ubc.metering.models import ApiKeySpend, GatewayHold, UsageRecord
from ubc.metering.rules import CallSettled, Grant, SpendAdded, UsageRecorded

usage_t = table(UsageRecord)
spend_t = table(ApiKeySpend)
gateway_holds_t = table(GatewayHold)
apikeys_t = table(ApiKey)


def spend_epoch_query() -> Any:
    """The spend epoch, as a scalar subquery (a literal column, so that a select can label
    it)."""
    return literal_column("(SELECT max(number) FROM epochs)")


def spend_epoch(session: Session) -> int:
    """The epoch a call's spend counts toward: the latest opened (0 before the first)."""
    value = session.execute(select(spend_epoch_query())).scalar_one_or_none()
    return int(value or 0)


def read_grant(session: Session, key_hash: str) -> Grant | None:
    row = session.execute(
        select(
            apikeys_t.c.account,
            apikeys_t.c.scopes,
            apikeys_t.c.models,
            apikeys_t.c.spend_cap_per_epoch,
        ).where(apikeys_t.c.key_hash == key_hash)
    ).first()
    if row is None:
        return None
    return Grant(row.account, row.scopes, row.models, row.spend_cap_per_epoch)


def read_spent(session: Session, key_hash: str, epoch: int) -> int:
    value = session.execute(
        select(spend_t.c.spent).where(spend_t.c.key_hash == key_hash, spend_t.c.epoch == epoch)
    ).scalar_one_or_none()
    return int(value or 0)


def add_spend(session: Session, change: SpendAdded, now: datetime) -> None:
    if not change.amount:
        return
    updated = session.execute(
        update(spend_t)
        .where(spend_t.c.key_hash == change.key_hash, spend_t.c.epoch == change.epoch)
        .values(spent=spend_t.c.spent + change.amount)
    )
    if not getattr(updated, "rowcount", 0):
        session.execute(
            insert(spend_t).values(
                key_hash=change.key_hash, epoch=change.epoch, spent=change.amount
            )
        )


def record_usage(session: Session, changes: list[UsageRecorded]) -> None:
    """Every billed call of a batch, in one statement."""
    session.execute(
        insert(usage_t),
        [
            {
                "request_id": c.request_id,
                "envelope_id": c.envelope_id,
                "account": c.account,
                "key_hash": c.key_hash,
                "model": c.model,
                "epoch": c.epoch,
                "input_tokens": c.input_tokens,
                "output_tokens": c.output_tokens,
                "held": c.held,
                "cost": c.cost,
                "created_at": c.created_at,
            }
            for c in changes
        ],
    )


def settle_calls(session: Session, changes: list[CallSettled]) -> None:
    """The batch's settled calls leave ``gateway_holds``."""
    ids = [c.request_id for c in changes]
    for start in range(0, len(ids), 1000):
        session.execute(
            delete(gateway_holds_t).where(
                gateway_holds_t.c.request_id.in_(ids[start : start + 1000])
            )
        )
