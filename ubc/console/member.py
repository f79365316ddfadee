"""A member's pages (signed in with an API key that has the ``read`` scope): balances,
history, model spend, donations, offers and trades, API keys, withdrawals. Each reads
through the API's own route functions or services, as the key's principal: what the API
would refuse this key, the page refuses too. Actions link to the signing pages (the
browser signs; these pages only read)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ubc.apikey_routes import get_api_keys
from ubc.causes.routes import get_donations
from ubc.console.charts import bar_chart
from ubc.console.web import SignedIn, harden, page, signed_in, to_signin
from ubc.db import table
from ubc.deps import ReadSession
from ubc.errors import UbcError
from ubc.ledger.routes import get_account, get_history
from ubc.market import service as market
from ubc.market.routes import list_trades, list_withdrawals
from ubc.members.routes import get_member
from ubc.metering.models import UsageRecord

router = APIRouter(include_in_schema=False)
usage_t = table(UsageRecord)
SPEND_DAYS = 30
PAGE_SIZE = 25


def _member(request: Request, session: Session) -> SignedIn | Response:
    reader = signed_in(request, session)
    if reader is None:
        return to_signin(request)
    if reader.account is None:
        return harden(RedirectResponse("/operator", status_code=303))
    return reader


def _show(
    request: Request,
    session: Session,
    template: str,
    build: Callable[[SignedIn, str], dict[str, Any]],
) -> Response:
    found = _member(request, session)
    if isinstance(found, Response):
        return found
    address = found.account
    assert address is not None
    try:
        context = build(found, address)
    except UbcError as exc:
        return page(
            request, "error.html", reader=found, message=str(exc), status_code=exc.status_code
        )
    return page(request, template, reader=found, address=address, **context)


@router.get("/me", response_class=HTMLResponse)
def me(request: Request, session: ReadSession) -> Response:
    """Available and pending balance per asset, and who the member is."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        profile: dict[str, Any] | None = None
        if address.startswith("member:"):
            profile = get_member(address.removeprefix("member:"), session, reader.principal)
        return {
            "profile": profile,
            "balances": get_account(address, session, reader.principal)["balances"],
        }

    return _show(request, session, "me/balances.html", build)


@router.get("/me/history", response_class=HTMLResponse)
def history(request: Request, session: ReadSession, cursor: str | None = None) -> Response:
    """The account's postings, newest first, a page at a time."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        found = get_history(address, session, reader.principal, cursor=cursor, limit=PAGE_SIZE)
        return {"items": found["items"], "next_cursor": found["next_cursor"], "cursor": cursor}

    return _show(request, session, "me/history.html", build)


def spend(session: Session, address: str, now: datetime) -> dict[str, Any]:
    """Model calls of an account: by model (all time) and by day (the last 30 days), in
    tokens and in CU."""
    by_model: list[dict[str, Any]] = [
        {
            "model": r.model,
            "calls": int(r.calls),
            "tokens": int(r.input_tokens or 0) + int(r.output_tokens or 0),
            "input_tokens": int(r.input_tokens or 0),
            "output_tokens": int(r.output_tokens or 0),
            "cost": int(r.cost or 0),
        }
        for r in session.execute(
            select(
                usage_t.c.model,
                func.count().label("calls"),
                func.sum(usage_t.c.input_tokens).label("input_tokens"),
                func.sum(usage_t.c.output_tokens).label("output_tokens"),
                func.sum(usage_t.c.cost).label("cost"),
            )
            .where(usage_t.c.account == address)
            .group_by(usage_t.c.model)
            .order_by(func.sum(usage_t.c.cost).desc(), usage_t.c.model)
        )
    ]
    since = now - timedelta(days=SPEND_DAYS)
    days: dict[str, dict[str, int]] = {}
    for r in session.execute(
        select(
            usage_t.c.created_at, usage_t.c.input_tokens, usage_t.c.output_tokens, usage_t.c.cost
        ).where(usage_t.c.account == address, usage_t.c.created_at >= since)
    ):
        day = days.setdefault(r.created_at.date().isoformat(), {"calls": 0, "tokens": 0, "cost": 0})
        day["calls"] += 1
        day["tokens"] += int(r.input_tokens) + int(r.output_tokens)
        day["cost"] += int(r.cost)
    by_day: list[dict[str, Any]] = [{"day": d, **v} for d, v in sorted(days.items())]
    return {
        "by_model": by_model,
        "by_day": by_day,
        "charts": [
            bar_chart("CU by model", [(m["model"], m["cost"]) for m in by_model], "CU"),
            bar_chart("Tokens by model", [(m["model"], m["tokens"]) for m in by_model]),
            bar_chart(
                f"CU by day (last {SPEND_DAYS} days)",
                [(d["day"], d["cost"]) for d in by_day],
                "CU",
            ),
            bar_chart(
                f"Tokens by day (last {SPEND_DAYS} days)", [(d["day"], d["tokens"]) for d in by_day]
            ),
        ],
    }


@router.get("/me/spend", response_class=HTMLResponse)
def spend_page(request: Request, session: ReadSession) -> Response:
    """Model spend by day and by model, as charts and tables (tokens and CU)."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        if not reader.principal.may_read(address):
            raise UbcError("this key may not read the account")
        return spend(session, address, request.app.state.clock.now())

    return _show(request, session, "me/spend.html", build)


@router.get("/me/donations", response_class=HTMLResponse)
def donations(request: Request, session: ReadSession, cursor: str | None = None) -> Response:
    """Donations, each with its journal entry (the receipt whose inclusion can be proved)."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        found = get_donations(address, session, reader.principal, cursor=cursor, limit=PAGE_SIZE)
        return {"donations": found["donations"], "next_cursor": found["next_cursor"]}

    return _show(request, session, "me/donations.html", build)


@router.get("/me/market", response_class=HTMLResponse)
def my_market(request: Request, session: ReadSession, cursor: str | None = None) -> Response:
    """The member's open offers, and the trades it bought or sold."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        now = request.app.state.clock.now()
        found = list_trades(session, reader.principal, account=address, cursor=cursor, limit=50)
        offers = market.open_offers(session, now=now, seller=address, limit=100)
        return {
            "offers": [o.to_json(now) for o in offers],
            "trades": found["trades"],
            "next_cursor": found["next_cursor"],
        }

    return _show(request, session, "me/market.html", build)


@router.get("/me/keys", response_class=HTMLResponse)
def keys(request: Request, session: ReadSession) -> Response:
    """API keys granted on the account (hashes only), what each spent; revoke links."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        return {"apikeys": get_api_keys(address, session, reader.principal)["apikeys"]}

    return _show(request, session, "me/keys.html", build)


@router.get("/me/withdrawals", response_class=HTMLResponse)
def withdrawals(request: Request, session: ReadSession) -> Response:
    """Withdrawals the member asked for, and their status."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        found = list_withdrawals(session, reader.principal, account=address, limit=100)
        return {"withdrawals": found["withdrawals"]}

    return _show(request, session, "me/withdrawals.html", build)
