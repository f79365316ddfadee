"""A member's pages (signed in with an API key that has the ``read`` scope): balances,
history, model spend, donations, offers and trades, API keys, withdrawals. Each reads
through the API's own route functions or services, as the key's principal: what the API
would refuse this key, the page refuses too. Actions link to the signing pages (the
browser signs; these pages only read)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from ubc.apikey_routes import get_api_keys
from ubc.causes.routes import get_donations
from ubc.console.charts import bar_chart
from ubc.console.web import SignedIn, harden, page, signed_in, to_signin
from ubc.deps import ReadSession
from ubc.errors import UbcError
from ubc.gateway.usage import get_usage
from ubc.journal import store
from ubc.journal.checkpoint import format_tlog_proof
from ubc.journal.merkle import inclusion_proof
from ubc.ledger.routes import get_account, get_history
from ubc.market import service as market
from ubc.market.routes import list_trades, list_withdrawals
from ubc.members.routes import get_member
from ubc.params import MAX_DB_INT

router = APIRouter(include_in_schema=False)
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


def spend(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Model calls of an account (the API's ``/usage`` rows: per UTC day and model), by
    model and by day, in tokens and in CU."""
    models: dict[str, dict[str, int]] = {}
    days: dict[str, dict[str, int]] = {}
    for row in items:
        tokens = int(row["input_tokens"]) + int(row["output_tokens"])
        m = models.setdefault(
            row["model"],
            {"calls": 0, "tokens": 0, "input_tokens": 0, "output_tokens": 0, "cost": 0},
        )
        m["calls"] += int(row["calls"])
        m["tokens"] += tokens
        m["input_tokens"] += int(row["input_tokens"])
        m["output_tokens"] += int(row["output_tokens"])
        m["cost"] += int(row["cost"])
        d = days.setdefault(str(row["day"]), {"calls": 0, "tokens": 0, "cost": 0})
        d["calls"] += int(row["calls"])
        d["tokens"] += tokens
        d["cost"] += int(row["cost"])
    by_model: list[dict[str, Any]] = sorted(
        ({"model": name, **v} for name, v in models.items()),
        key=lambda m: (-m["cost"], m["model"]),
    )
    by_day: list[dict[str, Any]] = [{"day": d, **v} for d, v in sorted(days.items())]
    return {
        "by_model": by_model,
        "by_day": by_day,
        "charts": [
            bar_chart("CU by model", [(m["model"], m["cost"]) for m in by_model], "CU"),
            bar_chart("Tokens by model", [(m["model"], m["tokens"]) for m in by_model]),
            bar_chart("CU by day", [(d["day"], d["cost"]) for d in by_day], "CU"),
            bar_chart("Tokens by day", [(d["day"], d["tokens"]) for d in by_day]),
        ],
    }


@router.get("/me/spend", response_class=HTMLResponse)
def spend_page(request: Request, session: ReadSession) -> Response:
    """Model spend by day and by model, as charts and tables (tokens and CU)."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        found = get_usage(request, address, session, reader.principal, since=None, until=None)
        return {"since": found["since"], "until": found["until"], **spend(found["items"])}

    return _show(request, session, "me/spend.html", build)


@router.get("/me/donations", response_class=HTMLResponse)
def donations(request: Request, session: ReadSession, cursor: str | None = None) -> Response:
    """Donations, each with its journal entry (the receipt whose inclusion can be proved)."""

    def build(reader: SignedIn, address: str) -> dict[str, Any]:
        found = get_donations(address, session, reader.principal, cursor=cursor, limit=PAGE_SIZE)
        return {"donations": found["donations"], "next_cursor": found["next_cursor"]}

    return _show(request, session, "me/donations.html", build)


@router.get("/me/receipts/{seq}.tlog-proof")
def receipt(
    request: Request,
    session: ReadSession,
    seq: Annotated[int, Path(ge=0, le=MAX_DB_INT)],
) -> Response:
    """The receipt of one of the account's own journal entries: the same
    ``c2sp.org/tlog-proof@v1`` file as ``ubc proof get SEQ`` writes (the entry, its
    inclusion proof, the current checkpoint as served)."""
    found = _member(request, session)
    if isinstance(found, Response):
        return found
    size, checkpoint = store.latest_checkpoint(session)
    rows = store.entries(session, seq, seq + 1) if seq < size else []
    if not rows or found.account not in rows[0][2].split():
        return page(
            request,
            "error.html",
            reader=found,
            message=f"No journal entry {seq} of {found.account}.",
            status_code=404,
        )
    _, entry, _ = rows[0]
    proof = inclusion_proof(seq, size, store.HashTable(session))
    body = format_tlog_proof(seq, proof, checkpoint, extra=entry)
    return harden(
        Response(
            body,
            media_type="text/plain; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="proof-{seq}.tlog-proof"'},
        )
    )


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
