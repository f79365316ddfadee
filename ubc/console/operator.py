"""The operator's pages (signed in with the operator token; the auditor's token reads them
too): the ledger's health, members, epochs with live progress, the utilization report as
charts with its CSV, causes, pending withdrawals. Reads only: every action links to its
signing page under ``/operator/act/`` (the operator key signs in the browser)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from starlette.requests import Request as StarletteRequest

from ubc.causes import service as causes
from ubc.console.charts import bar_chart
from ubc.console.web import SignedIn, page, signed_in, to_signin
from ubc.db import table
from ubc.deps import ReadSession, RequestReads
from ubc.epochs import report
from ubc.epochs import service as epochs
from ubc.epochs.models import EpochAllocation
from ubc.epochs.routes import utilization_report
from ubc.errors import UbcError
from ubc.journal import store
from ubc.journal.models import JournalEntry
from ubc.ledger.models import Account, Transfer
from ubc.market import service as market
from ubc.members.models import Member

router = APIRouter(include_in_schema=False)
entries_t = table(JournalEntry)
members_t = table(Member)
transfers_t = table(Transfer)
accounts_t = table(Account)
allocations_t = table(EpochAllocation)
MEMBER_ROWS = 100
REPORT_MEMBERS = 50_000
BUCKETS = [(0, 10), (10, 25), (25, 50), (50, 75), (75, 100)]


def operator_page(
    request: Request,
    session: Session,
    template: str,
    build: Callable[[SignedIn], dict[str, Any]],
) -> Response:
    """``template`` with what ``build`` reads, for the operator (and auditors) only: a
    reader without a session is sent to sign in, a member is refused."""
    reader = signed_in(request, session)
    if reader is None:
        return to_signin(request)
    if not reader.is_operator:
        return page(
            request,
            "error.html",
            reader=reader,
            message="These pages are for the operator (and auditors): sign in with the "
            "operator token.",
            status_code=403,
        )
    try:
        context = build(reader)
    except UbcError as exc:
        return page(
            request, "error.html", reader=reader, message=str(exc), status_code=exc.status_code
        )
    return page(request, template, reader=reader, **context)


def health(session: Session, now: datetime) -> dict[str, Any]:
    """Journal size, checkpoint age, write rate, open holds, and what waits for the operator."""
    size, _ = store.latest_checkpoint(session)
    committed = None
    if size:
        committed = session.execute(
            select(entries_t.c.committed_at).where(entries_t.c.seq == size - 1)
        ).scalar_one_or_none()
    rates = {}
    for label, window in (("minute", timedelta(minutes=1)), ("hour", timedelta(hours=1))):
        rates[label] = int(
            session.execute(
                select(func.count()).where(entries_t.c.committed_at >= now - window)
            ).scalar_one()
        )
    holds = [
        {"asset": r.asset, "count": int(r.n), "amount": int(r.total or 0)}
        for r in session.execute(
            select(
                transfers_t.c.asset,
                func.count().label("n"),
                func.sum(transfers_t.c.amount).label("total"),
            )
            .where(transfers_t.c.state == "pending")
            .group_by(transfers_t.c.asset)
            .order_by(transfers_t.c.asset)
        )
    ]
    overdue = session.execute(
        select(func.count()).where(
            transfers_t.c.state == "pending", transfers_t.c.timeout_at <= now
        )
    ).scalar_one()
    statuses = {
        str(r.status): int(r.n)
        for r in session.execute(
            select(members_t.c.status, func.count().label("n")).group_by(members_t.c.status)
        )
    }
    pending_withdrawals = len(market.list_withdrawals(session, status="pending", account=None))
    age = None if committed is None else max(0, int((now - committed).total_seconds()))
    return {
        "size": size,
        "checkpoint_age": age,
        "committed_at": committed,
        "rates": rates,
        "holds": holds,
        "overdue": int(overdue or 0),
        "statuses": statuses,
        "pending_withdrawals": pending_withdrawals,
    }


@router.get("/operator", response_class=HTMLResponse)
def operator_home(request: Request, session: ReadSession) -> Response:
    return operator_page(
        request,
        session,
        "operator/health.html",
        lambda _: health(session, request.app.state.clock.now()),
    )


@router.get("/operator/members", response_class=HTMLResponse)
def members(
    request: Request,
    session: ReadSession,
    q: str | None = None,
    status: str | None = None,
    tier: str | None = None,
) -> Response:
    """Members, searched by handle or display name, filtered by status or tier."""

    def build(_: SignedIn) -> dict[str, Any]:
        stmt = select(
            members_t.c.handle,
            members_t.c.display_name,
            members_t.c.status,
            members_t.c.tier,
            members_t.c.created_at,
        )
        if q:
            pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            stmt = stmt.where(
                or_(
                    members_t.c.handle.ilike(pattern, escape="\\"),
                    members_t.c.display_name.ilike(pattern, escape="\\"),
                )
            )
        if status:
            stmt = stmt.where(members_t.c.status == status)
        if tier:
            stmt = stmt.where(members_t.c.tier == tier)
        rows = session.execute(stmt.order_by(members_t.c.handle).limit(MEMBER_ROWS + 1)).all()
        tiers = sorted(
            t
            for t in session.execute(select(members_t.c.tier).distinct()).scalars()
            if t is not None
        )
        return {
            "rows": rows[:MEMBER_ROWS],
            "more": len(rows) > MEMBER_ROWS,
            "q": q or "",
            "status": status or "",
            "tier": tier or "",
            "tiers": tiers,
        }

    return operator_page(request, session, "operator/members.html", build)


@router.get("/operator/epochs", response_class=HTMLResponse)
def epochs_page(request: Request, session: ReadSession) -> Response:
    """Every epoch, newest first; one opening or closing shows its progress, live."""

    def build(_: SignedIn) -> dict[str, Any]:
        return {"epochs": [e.to_json() for e in reversed(epochs.list_epochs(session))]}

    return operator_page(request, session, "operator/epochs.html", build)


def report_context(
    session: Session, epoch: int, price: str, below: Decimal, now: datetime
) -> dict[str, Any]:
    """The whole report of an epoch, as the charts show it."""
    rows: list[report.MemberUsage] = []
    totals = None
    cursor: str | None = None
    while len(rows) < REPORT_MEMBERS:
        found = report.utilization(
            session, epoch, cu_price_usd=price, now=now, cursor=cursor, limit=report.MAX_LIMIT
        )
        totals = totals or found.totals
        rows.extend(found.members)
        cursor = found.next_cursor
        if cursor is None:
            break
    tier_of = {
        str(r.address): str(r.tier)
        for r in session.execute(
            select(accounts_t.c.address, allocations_t.c.tier)
            .join(accounts_t, accounts_t.c.id == allocations_t.c.account_id)
            .where(allocations_t.c.epoch == epoch)
        )
    }
    buckets = {f"{lo}–{hi} %": 0 for lo, hi in BUCKETS}
    buckets["100 % and over"] = 0
    buckets["nothing allocated"] = 0
    by_tier: dict[str, dict[str, Any]] = {}
    low = []
    for row in rows:
        tier = tier_of.get(row.address, "(none)")
        t = by_tier.setdefault(
            tier,
            {"tier": tier, "members": 0, "allocated": 0, "used": 0, "alloc_usd": Decimal(0)},
        )
        t["members"] += 1
        t["allocated"] += row.allocated
        t["used"] += row.used
        t["alloc_usd"] += Decimal(row.allocated_usd)
        t.setdefault("used_usd", Decimal(0))
        t["used_usd"] += Decimal(row.used_usd)
        if row.allocated == 0:
            buckets["nothing allocated"] += 1
            continue
        ratio = Decimal(row.used) * 100 / Decimal(row.allocated)
        if ratio >= 100:
            buckets["100 % and over"] += 1
        else:
            for lo, hi in BUCKETS:
                if lo <= ratio < hi:
                    buckets[f"{lo}–{hi} %"] += 1
                    break
        if ratio < below:
            low.append(row)
    tiers = sorted(by_tier.values(), key=lambda t: t["tier"])
    return {
        "rows": rows,
        "totals": totals,
        "truncated": cursor is not None,
        "tiers": tiers,
        "below_members": low,
        "charts": [
            bar_chart("Members by utilization", list(buckets.items()), "members"),
            bar_chart("CU used by tier", [(t["tier"], t["used"]) for t in tiers], "CU"),
            bar_chart("CU allocated by tier", [(t["tier"], t["allocated"]) for t in tiers], "CU"),
            bar_chart(
                "Value used by tier (USD)", [(t["tier"], t["used_usd"]) for t in tiers], "USD"
            ),
        ],
    }


@router.get("/operator/report", response_class=HTMLResponse)
def report_page(
    request: Request,
    session: ReadSession,
    epoch: str | None = None,
    below: str | None = None,
) -> Response:
    """The utilization report of an epoch as charts, with its CSV."""

    def build(_: SignedIn) -> dict[str, Any]:
        listed = epochs.list_epochs(session)
        errors: dict[str, str] = {}
        number: int | None = listed[-1].number if listed else None
        if epoch:
            if epoch.isdigit() and 0 < int(epoch) < 2**62:
                number = int(epoch)
            else:
                errors["epoch"] = "An epoch is a whole number from 1."
        threshold = Decimal("10")
        if below:
            import re

            if re.fullmatch(report.PERCENT_PATTERN, below):
                threshold = Decimal(below)
            else:
                errors["below"] = "A percent such as 10 or 12.5."
        context: dict[str, Any] = {
            "epochs": [e.number for e in reversed(listed)],
            "epoch": number,
            "below": below or "10",
            "threshold": threshold,
            "errors": errors,
            "report": None,
        }
        if number is not None and "epoch" not in errors:
            try:
                info = epochs.get_epoch(session, number)
            except UbcError as exc:
                errors["epoch"] = str(exc)
                return context
            price = request.app.state.ledger_info["cu_price_usd"]
            context["info"] = info.to_json()
            context["price"] = price
            context["report"] = report_context(
                session, number, price, threshold, request.app.state.clock.now()
            )
        return context

    return operator_page(request, session, "operator/report.html", build)


@router.get("/operator/report.csv")
def report_csv(
    request: Request,
    session: ReadSession,
    reads: RequestReads,
    epoch: Annotated[int, Query(ge=1, le=2**62)],
) -> Response:
    """The API's CSV of the report (``Accept: text/csv``), streamed as the API streams it."""
    reader = signed_in(request, session)
    if reader is None:
        return to_signin(request)
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"accept"]
    scope = {**request.scope, "headers": [*headers, (b"accept", b"text/csv")]}
    as_csv = StarletteRequest(scope, request.receive)
    try:
        return utilization_report(  # type: ignore[no-any-return]
            as_csv, session, reads, reader.principal, epoch=epoch, below=None, cursor=None, limit=1
        )
    except UbcError as exc:
        return page(
            request, "error.html", reader=reader, message=str(exc), status_code=exc.status_code
        )


@router.get("/operator/causes", response_class=HTMLResponse)
def causes_page(request: Request, session: ReadSession) -> Response:
    def build(_: SignedIn) -> dict[str, Any]:
        return {"causes": causes.list_causes(session)}

    return operator_page(request, session, "operator/causes.html", build)


@router.get("/operator/withdrawals", response_class=HTMLResponse)
def withdrawals_page(request: Request, session: ReadSession) -> Response:
    def build(_: SignedIn) -> dict[str, Any]:
        return {
            "withdrawals": market.list_withdrawals(session, status="pending", account=None),
            "done": market.list_withdrawals(session, status="done", account=None, limit=20),
        }

    return operator_page(request, session, "operator/withdrawals.html", build)
