"""GET /journal/stream: journal entries as Server-Sent Events, live (docs/journal.md).

Each stream keeps its own cursor and reads entries from the database a page at a time
(never the whole journal), so the database is the only buffer: a consumer that reads
slowly holds its cursor while its TCP send buffer is full (backpressure), and the write
path never waits for a stream. One poller per process watches the journal's size and wakes
the streams that wait for new entries; idle streams cost no query.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import literal, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from ubc.auth import Principal, authenticate_bearer
from ubc.deps import Bearer
from ubc.errors import BadRequest, Forbidden, Unauthenticated, Unavailable
from ubc.journal import store
from ubc.journal.merkle import leaf_hash
from ubc.params import MAX_DB_INT
from ubc.schemas import error_responses

log = logging.getLogger(__name__)

router = APIRouter(tags=["journal"])

#: Entries read per query: the most a stream holds in memory at once.
PAGE = 200
#: How often the process's poller reads the journal's size while streams are open.
POLL_SECONDS = 0.05
#: A comment line this often on a stream with nothing to send (proxies, dead peers).
KEEPALIVE_SECONDS = 15.0
#: Sent to an EventSource: reconnect after this many milliseconds.
RETRY_MS = 1000


@dataclass(frozen=True, slots=True)
class Filter:
    """Which entries a stream carries: ``account`` None for every entry."""

    account: str | None
    types: tuple[str, ...]


@dataclass
class Head:
    """The journal's size as this process's poller last read it; streams wait on it."""

    sessions: sessionmaker[Session]
    size: int = -1
    streams: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def open(self) -> None:
        self.streams += 1
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._poll())

    def close(self) -> None:
        self.streams -= 1

    async def _poll(self) -> None:
        while self.streams > 0:
            try:
                size = await run_in_threadpool(self._read)
            except Exception:  # a database hiccup: the streams wait for the next poll
                log.warning("journal stream: reading the journal's size failed", exc_info=True)
            else:
                if size != self.size:
                    self.size = size
                    self.changed.set()
                    self.changed = asyncio.Event()
            await asyncio.sleep(POLL_SECONDS)

    def _read(self) -> int:
        session = self.sessions()
        try:
            return store.latest_checkpoint(session)[0]
        finally:
            session.rollback()
            session.close()


class Slot:
    """One of the process's stream places, given back once (explicitly or when collected)."""

    def __init__(self, head: Head) -> None:
        self.head: Head | None = head
        head.open()

    def release(self) -> None:
        if self.head is not None:
            self.head.close()
            self.head = None


@router.get(
    "/journal/stream",
    summary="Journal entries from seq on, live, as Server-Sent Events",
    response_class=StreamingResponse,
    openapi_extra={"security": [{}]},
    responses={
        200: {
            "description": "events `id: <seq>`, `event: entry`, `data: {seq, type, leaf_hash, "
            "entry}`, and keep-alive comments",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(
            401,
            403,
            422,
            503,
            notes={
                400: "a Last-Event-ID that is not a sequence number",
                401: "no bearer on a restricted journal, or an invalid one",
                403: "a key that may read no entry",
                503: "too many streams open on this server (Retry-After)",
            },
        ),
    },
)
async def stream(
    request: Request,
    _bearer: Bearer,
    start: Annotated[
        int | None,
        Query(alias="from", ge=0, le=MAX_DB_INT, description="the first seq (default: live)"),
    ] = None,
    types: Annotated[
        list[str] | None, Query(alias="type", description="only entries of these types")
    ] = None,
    last_event_id: Annotated[
        str | None, Header(description="resume after this seq (wins over `from`)")
    ] = None,
) -> StreamingResponse:
    resume = _resume_after(last_event_id)
    settings = request.app.state.settings
    head = _head(request)
    if head.streams >= settings.journal_stream_max:
        raise Unavailable(
            f"at most {settings.journal_stream_max} journal streams at once; retry later",
            retry_after=5,
        )
    sessions = request.app.state.read_sessions
    authorization = request.headers.get("authorization")
    which, size = await run_in_threadpool(_admit, request, sessions, authorization, types)
    cursor = resume + 1 if resume is not None else start if start is not None else size
    slot = Slot(head)
    events = _events(sessions, head, which, cursor, slot)
    weakref.finalize(events, slot.release)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _resume_after(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        seq = int(value.strip())
    except ValueError:
        seq = -1
    if not 0 <= seq < MAX_DB_INT:
        raise BadRequest("Last-Event-ID must be a journal sequence number", detail={"id": value})
    return seq


def _head(request: Request) -> Head:
    state = request.app.state
    head: Head | None = getattr(state, "journal_stream_head", None)
    if head is None:
        head = Head(state.read_sessions)
        state.journal_stream_head = head
    return head


def _admit(
    request: Request,
    sessions: sessionmaker[Session],
    authorization: str | None,
    types: list[str] | None,
) -> tuple[Filter, int]:
    """Who reads which entries (as GET /journal/entries decides), and the journal's size."""
    session = sessions()
    try:
        reader = None
        if authorization is not None:
            reader = authenticate_bearer(
                session,
                authorization,
                tokens=request.app.state.tokens,
                now=request.app.state.clock.now(),
                api_keys=request.app.state.api_key_principal,
            )
        size = store.latest_checkpoint(session)[0]
    finally:
        session.rollback()
        session.close()
    kinds = tuple(sorted(set(types or ())))
    if _sees_all(request, reader):
        return Filter(None, kinds), size
    if reader is None:
        raise Unauthenticated("the journal's entries need a bearer token")
    if reader.account is None or not reader.may_read(reader.account):
        raise Forbidden("this key may read no journal entry (it needs the read scope)")
    return Filter(reader.account, kinds), size


def _sees_all(request: Request, reader: Principal | None) -> bool:
    """As GET /journal/entries: everyone on a public journal, else the operator and auditors."""
    if request.app.state.settings.journal_access == "public":
        return True
    return reader is not None and reader.sees_everything


async def _events(
    sessions: sessionmaker[Session], head: Head, which: Filter, cursor: int, slot: Slot
) -> AsyncIterator[bytes]:
    try:
        yield f"retry: {RETRY_MS}\n: ubc journal stream from {cursor}\n\n".encode()
        quiet_since = time.monotonic()
        while True:
            changed = head.changed
            if head.size < 0 or cursor < head.size:
                chunk, cursor, more = await run_in_threadpool(_page, sessions, which, cursor)
                if chunk:
                    yield chunk
                    quiet_since = time.monotonic()
                if more:
                    continue
            wait = KEEPALIVE_SECONDS - (time.monotonic() - quiet_since)
            if wait <= 0:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
                continue
            try:
                await asyncio.wait_for(changed.wait(), timeout=wait)
            except TimeoutError:
                pass
    finally:
        slot.release()


def _page(sessions: sessionmaker[Session], which: Filter, cursor: int) -> tuple[bytes, int, bool]:
    """The events of the entries from ``cursor`` on (one page at most); the next cursor;
    whether the journal holds more beyond it."""
    session = sessions()
    try:
        size = store.latest_checkpoint(session)[0]
        if cursor >= size:
            return b"", cursor, False
        end = min(cursor + PAGE, size)
        t = store.entries_t
        query = select(t.c.seq, t.c.type, t.c.entry, t.c.accounts).where(
            t.c.seq >= cursor, t.c.seq < end
        )
        if which.account is not None:
            spaced = literal(" ") + t.c.accounts + literal(" ")
            query = query.where(spaced.contains(f" {which.account} ", autoescape=True))
        if which.types:
            query = query.where(t.c.type.in_(which.types))
        rows = session.execute(query.order_by(t.c.seq)).all()
    finally:
        session.rollback()
        session.close()
    out = []
    for row in rows:
        if which.account is not None and which.account not in str(row.accounts).split():
            continue
        out.append(event(int(row.seq), str(row.type), bytes(row.entry)))
    return b"".join(out), end, end < size


def event(seq: int, type_: str, entry: bytes) -> bytes:
    """One SSE event: the entry as GET /journal/entries serves it, with its type."""
    data: dict[str, Any] = {
        "seq": seq,
        "type": type_,
        "leaf_hash": base64.b64encode(leaf_hash(entry)).decode(),
        "entry": base64.b64encode(entry).decode(),
    }
    body = json.dumps(data, separators=(",", ":"))
    return f"id: {seq}\nevent: entry\ndata: {body}\n\n".encode()
