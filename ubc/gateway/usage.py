"""A member's model spend by day and model (``ubc usage``), from the usage records that
journaled ``usage`` entries left (an auditor's replay rebuilds the same table)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import ColumnElement, func, literal_column, select
from sqlalchemy.orm import Session

from ubc.db import on_postgresql, table
from ubc.deps import Reader, ReadSession, require_read
from ubc.gateway.models import UsageRecord
from ubc.ledger.schemas import AccountUsage
from ubc.params import day_range
from ubc.schemas import error_responses

router = APIRouter(tags=["openai"])
usage_t = table(UsageRecord)


def spend_by_day(session: Session, account: str, since: date, until: date) -> list[dict[str, Any]]:
    """Calls, tokens and CU spent per UTC day and model, ``since`` ≤ day ≤ ``until``."""
    day: ColumnElement[Any]
    if on_postgresql(session):
        day = literal_column("to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')")
    else:
        day = func.substr(usage_t.c.created_at, 1, 10)
    start = datetime(since.year, since.month, since.day, tzinfo=UTC)
    end = datetime(until.year, until.month, until.day, tzinfo=UTC) + timedelta(days=1)
    rows = session.execute(
        select(
            day.label("day"),
            usage_t.c.model,
            func.count().label("calls"),
            func.sum(usage_t.c.input_tokens).label("input_tokens"),
            func.sum(usage_t.c.output_tokens).label("output_tokens"),
            func.sum(usage_t.c.cost).label("cost"),
        )
        .where(
            usage_t.c.account == account,
            usage_t.c.created_at >= start,
            usage_t.c.created_at < end,
        )
        .group_by(day, usage_t.c.model)
        .order_by(day, usage_t.c.model)
    )
    return [
        {
            "day": r.day,
            "model": r.model,
            "calls": int(r.calls),
            "input_tokens": int(r.input_tokens),
            "output_tokens": int(r.output_tokens),
            "cost": int(r.cost),
        }
        for r in rows
    ]


@router.get(
    "/api/accounts/{address}/usage",
    summary="Model spend of an account by day and model",
    response_model=AccountUsage,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 422, notes={400: "a day out of range"}),
)
def get_usage(
    request: Request,
    address: str,
    session: ReadSession,
    reader: Reader,
    since: Annotated[date | None, Query(description="first UTC day (default: 30 days ago)")] = None,
    until: Annotated[date | None, Query(description="last UTC day (default: today)")] = None,
) -> dict[str, Any]:
    require_read(reader, address)
    today = request.app.state.clock.now().date()  # the ledger's time
    since, until = day_range(since, until, today=today)  # 400 out of range, not an overflow
    rows = spend_by_day(session, address, since, until)
    return {
        "address": address,
        "since": str(since),
        "until": str(until),
        "items": rows,
        "total_cost": sum(r["cost"] for r in rows),
    }
