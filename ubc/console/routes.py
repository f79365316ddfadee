"""The console's routes: the public pages, sign-in and sign-out (Jinja2 templates,
autoescaped), and the member's and operator's pages (``ubc.console.member``,
``ubc.console.operator``). The pages read through the same functions as the API, with
the same checks of who may read what."""

from __future__ import annotations

import base64
from datetime import datetime
from email.parser import BytesParser
from email.policy import HTTP
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ubc.causes import service as causes
from ubc.console import member, operator
from ubc.console.web import (
    CONSOLE_CSP,
    HERE,
    STATIC_URL,
    authenticate,
    clear_session,
    csrf_ok,
    harden,
    page,
    read_form,
    set_session,
    signed_in,
    templates,
)
from ubc.db import table
from ubc.deps import ReadSession
from ubc.epochs import service as epochs
from ubc.epochs.models import EpochAllocation
from ubc.errors import UbcError
from ubc.journal import store
from ubc.journal.checkpoint import parse_checkpoint, parse_tlog_proof
from ubc.journal.merkle import ProofError, inclusion_proof, leaf_hash, verify_inclusion
from ubc.journal.models import JournalEntry
from ubc.market import service as market
from ubc.params import MAX_DB_INT
from ubc.signing import NoteError, NoteVerifier

__all__ = ["CONSOLE_CSP", "STATIC_URL", "page", "router", "static", "templates"]

router = APIRouter(include_in_schema=False)
static = StaticFiles(directory=HERE / "static")
entries_t = table(JournalEntry)
allocations_t = table(EpochAllocation)
MAX_PROOF_FILE = 1024 * 1024
HISTORY_ROWS = 50
HISTORY_WINDOW = 5000


def _age(now: datetime, then: datetime | None) -> str | None:
    """A duration in words: "42 s", "5 min", "3 h", "2 d"."""
    if then is None:
        return None
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def latest_commit(session: Session, size: int) -> datetime | None:
    """When the latest entry was committed: the checkpoint is signed with every batch."""
    if size == 0:
        return None
    value = session.execute(
        select(entries_t.c.committed_at).where(entries_t.c.seq == size - 1)
    ).scalar_one_or_none()
    return value if isinstance(value, datetime) else None


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: ReadSession) -> Response:
    """The ledger's origin, vkey and latest signed checkpoint, with its age."""
    size, checkpoint = store.latest_checkpoint(session)
    now: datetime = request.app.state.clock.now()
    committed = latest_commit(session, size)
    return page(
        request,
        "home.html",
        reader=signed_in(request, session),
        size=size,
        checkpoint=checkpoint,
        now=now,
        signed_at=committed,
        age=_age(now, committed),
    )


@router.get("/checkpoints", response_class=HTMLResponse)
def checkpoints(
    request: Request,
    session: ReadSession,
    before: Annotated[int | None, Query(ge=1, le=MAX_DB_INT)] = None,
) -> Response:
    """The tree heads the ledger signed, newest first: one per committed batch (entries
    committed together share their commit time), read from a window of the latest
    entries by primary key (never a scan of the whole journal)."""
    size, checkpoint = store.latest_checkpoint(session)
    top = size if before is None else min(before, size)
    low = max(0, top - HISTORY_WINDOW)
    batches: list[list[Any]] = []  # [first seq, end (= the head's size), committed_at]
    for r in session.execute(
        select(entries_t.c.seq, entries_t.c.committed_at)
        .where(entries_t.c.seq >= low, entries_t.c.seq < top)
        .order_by(entries_t.c.seq)
    ):
        seq = int(r.seq)
        if batches and batches[-1][2] == r.committed_at and batches[-1][1] == seq:
            batches[-1][1] = seq + 1
        else:
            batches.append([seq, seq + 1, r.committed_at])
    if low > 0 and len(batches) > 1:
        batches = batches[1:]  # the oldest may have begun below the window
    batches.reverse()
    shown = batches[:HISTORY_ROWS]
    now: datetime = request.app.state.clock.now()
    heads = [
        {
            "size": end,
            "root": base64.b64encode(store.root(session, end)).decode(),
            "entries": end - first,
            "committed_at": committed_at,
            "age": _age(now, committed_at),
        }
        for first, end, committed_at in shown
    ]
    older = shown[-1][0] if shown and shown[-1][0] > 0 else None
    return page(
        request,
        "checkpoints.html",
        reader=signed_in(request, session),
        size=size,
        checkpoint=checkpoint,
        heads=heads,
        older=older,
    )


@router.get("/epochs", response_class=HTMLResponse)
def epochs_page(request: Request, session: ReadSession) -> Response:
    """Every epoch: status, allocations, and its members and totals per tier."""
    tiers: dict[int, list[dict[str, Any]]] = {}
    for r in session.execute(
        select(
            allocations_t.c.epoch,
            allocations_t.c.tier,
            func.count().label("members"),
            func.sum(allocations_t.c.amount).label("total"),
        )
        .group_by(allocations_t.c.epoch, allocations_t.c.tier)
        .order_by(allocations_t.c.epoch, allocations_t.c.tier)
    ):
        tiers.setdefault(int(r.epoch), []).append(
            {"tier": r.tier, "members": int(r.members), "total": int(r.total or 0)}
        )
    listed = [e.to_json() for e in reversed(epochs.list_epochs(session))]
    return page(
        request,
        "epochs.html",
        reader=signed_in(request, session),
        epochs=listed,
        tiers=tiers,
    )


@router.get("/causes", response_class=HTMLResponse)
def causes_page(request: Request, session: ReadSession) -> Response:
    """Every cause: stewards, what it was given, by how many donors, and what it spent."""
    return page(
        request,
        "causes.html",
        reader=signed_in(request, session),
        causes=causes.list_causes(session),
    )


@router.get("/market", response_class=HTMLResponse)
def market_page(request: Request, session: ReadSession) -> Response:
    """The order book (open offers, best unit price first) and the latest trades. Who
    traded is shown to the operator and auditors, or to anyone when the journal is
    public (``UBC_JOURNAL_ACCESS=public``); otherwise only amounts, prices and times."""
    now: datetime = request.app.state.clock.now()
    reader = signed_in(request, session)
    offers = [o.to_json(now) for o in market.open_offers(session, now=now, limit=100)]
    trades, _ = market.trades(session, account=None, limit=20, before=None)
    parties = request.app.state.settings.journal_access == "public" or (
        reader is not None and reader.is_operator
    )
    return page(
        request,
        "market.html",
        reader=reader,
        offers=offers,
        trades=trades,
        parties=parties,
    )


# --- receipts -------------------------------------------------------------------------------


def _proof_text(content_type: str, body: bytes) -> str | None:
    """The tlog-proof in a form: the ``file`` part of a multipart body (an upload), or
    the ``proof`` field of a urlencoded one (pasted)."""
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") in ("file", "proof"):
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes) and payload.strip():
                    return payload.decode("utf-8")
        return None
    from urllib.parse import parse_qs

    fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
    text = (fields.get("proof") or [""])[0]
    return text or None


def check_receipt(request: Request, session: Session, text: str) -> dict[str, Any]:
    """Whether a tlog-proof's entry is included under the ledger's current checkpoint:
    the proof's checkpoint is signed by this ledger, the entry is in that tree, and that
    tree is a prefix of the current one (which contains the entry at the same index)."""
    vkey = request.app.state.ledger_info["vkey"]
    try:
        proof = parse_tlog_proof(text)
    except ValueError as exc:
        return {"ok": False, "reason": f"This is not a tlog-proof file: {exc}"}
    if proof.extra is None:
        return {"ok": False, "reason": "The proof file does not carry the entry."}
    try:
        signed = parse_checkpoint(NoteVerifier.from_vkey(vkey).verify(proof.checkpoint))
    except (NoteError, ValueError) as exc:
        return {"ok": False, "reason": f"Its checkpoint is not signed by this ledger: {exc}"}
    leaf = leaf_hash(proof.extra)
    try:
        verify_inclusion(leaf, proof.index, signed.size, list(proof.proof), signed.root)
    except (ProofError, ValueError) as exc:
        return {"ok": False, "reason": f"The entry is not in the tree it names: {exc}"}
    size, current = store.latest_checkpoint(session)
    if signed.size > size or store.root(session, signed.size) != signed.root:
        return {
            "ok": False,
            "reason": "The proof's checkpoint is not a state of this ledger's journal.",
        }
    now_root = parse_checkpoint(NoteVerifier.from_vkey(vkey).verify(current)).root
    path = inclusion_proof(proof.index, size, store.HashTable(session))
    try:
        verify_inclusion(leaf, proof.index, size, path, now_root)
    except (ProofError, ValueError) as exc:
        return {"ok": False, "reason": f"The entry is not under the current checkpoint: {exc}"}
    return {
        "ok": True,
        "seq": proof.index,
        "proof_size": signed.size,
        "size": size,
        "root": base64.b64encode(now_root).decode(),
        "entry": proof.extra.decode("utf-8", errors="replace"),
    }


@router.get("/receipt", response_class=HTMLResponse)
def receipt_form(request: Request, session: ReadSession) -> Response:
    return page(request, "receipt.html", reader=signed_in(request, session), result=None)


@router.post("/receipt", response_class=HTMLResponse)
async def receipt_check(request: Request, session: ReadSession) -> Response:
    """Check an uploaded (or pasted) ``.tlog-proof`` file: nothing is stored."""
    reader = signed_in(request, session)
    body = await request.body()
    if len(body) > MAX_PROOF_FILE:
        result = {"ok": False, "reason": f"The file is over {MAX_PROOF_FILE} bytes."}
        return page(request, "receipt.html", reader=reader, result=result, status_code=413)
    try:
        text = _proof_text(request.headers.get("content-type", ""), body)
    except (UnicodeDecodeError, ValueError):
        text = None
    if text is None:
        result = {"ok": False, "reason": "Choose a .tlog-proof file (or paste one)."}
        return page(request, "receipt.html", reader=reader, result=result, status_code=400)
    result = check_receipt(request, session, text)
    return page(request, "receipt.html", reader=reader, result=result)


# --- sign-in --------------------------------------------------------------------------------


def _next(target: str | None) -> str:
    """A local path to go to after signing in (never another site)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return ""


@router.get("/signin", response_class=HTMLResponse)
def signin_form(request: Request, session: ReadSession, next: str | None = None) -> Response:
    return page(
        request,
        "signin.html",
        reader=signed_in(request, session),
        next=_next(next),
        error=None,
    )


@router.post("/signin", response_class=HTMLResponse)
async def signin(request: Request, session: ReadSession) -> Response:
    """Take an API key or a token once, from the POST body; keep it in the session cookie."""
    form = await read_form(request)
    target = _next(form.get("next"))
    if not csrf_ok(request, form, None):
        return page(
            request,
            "signin.html",
            next=target,
            error="This form expired or came from another site: please try again.",
            status_code=403,
        )
    secret = form.get("secret", "").strip()
    if not secret:
        return page(
            request,
            "signin.html",
            next=target,
            error="Paste your API key or the operator token.",
            status_code=400,
        )
    try:
        principal = authenticate(request, session, secret)
    except UbcError as exc:
        return page(
            request,
            "signin.html",
            next=target,
            error=f"Not signed in: {exc}",
            status_code=401,
        )
    if principal.account is not None and "read" not in principal.scopes:
        return page(
            request,
            "signin.html",
            next=target,
            error="This API key has no read scope: grant one with the read scope to sign in.",
            status_code=403,
        )
    default = "/operator" if principal.sees_everything else "/me"
    response = RedirectResponse(target or default, status_code=303)
    set_session(request, response, secret)
    return harden(response)


@router.post("/signout")
async def signout(request: Request, session: ReadSession) -> Response:
    form = await read_form(request)
    reader = signed_in(request, session)
    if reader is not None and not csrf_ok(request, form, reader):
        return page(
            request,
            "error.html",
            reader=reader,
            message="This form expired or came from another site: please try again.",
            status_code=403,
        )
    response = RedirectResponse("/", status_code=303)
    clear_session(request, response)
    return harden(response)


router.include_router(member.router)
router.include_router(operator.router)
