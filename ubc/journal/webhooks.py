"""Webhooks: the journal's entries POSTed to the operator's endpoints (docs/events.md).

The operator registers endpoints (``/api/webhooks``, ``ubc webhooks add``): a URL, the
payload types it wants (none: every entry) and a secret. One process of all (the leader
of the background job ``webhooks``: ``ubc.db.leader``) runs the :class:`Deliverer`, which
delivers each matching journal entry to each endpoint **in journal order, at least
once**:

- every endpoint has a cursor (the next seq to consider), advanced only when the
  endpoint answered 2xx to the entry (or when the entries skipped do not match its
  types), so a crash between a delivery and its record only sends it again;
- a failure (non-2xx, timeout, refused connection) is retried after a backoff from
  :data:`BACKOFF_FIRST` seconds, doubling up to :data:`BACKOFF_CAP` (one hour), with
  jitter; when the same entry has failed for ``UBC_WEBHOOK_RETRY_SECONDS`` (a day by
  default) the endpoint is marked ``failing`` and left alone until it is re-enabled (a
  replay);
- each endpoint is delivered by its own task, so one that fails or hangs never delays
  the others;
- every attempt is recorded in the delivery log (``webhook_deliveries``), kept for
  ``UBC_WEBHOOK_LOG_RETENTION_SECONDS``; the rows of a run of deliveries are written with
  the cursor's move in one transaction (see :meth:`Deliverer._deliver`), not one commit
  per delivery.

The body of a delivery is the JSON object of an SSE event's data (``ubc.journal.stream``)
and it is signed: ``ubc-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>">`` under the endpoint's secret. Times (the signature's ``t``, the backoff,
the log) come from the ledger's clock, so tests move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    String,
    Text,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import Field, SQLModel

from ubc import metrics
from ubc.clock import Clock
from ubc.db import table
from ubc.dbtypes import UTCDateTime
from ubc.journal import store
from ubc.journal.merkle import leaf_hash

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "Deliverer",
    "WebhookDelivery",
    "WebhookEndpoint",
    "backoff_seconds",
    "event_body",
    "new_secret",
    "sign",
    "signature_header",
]

log = logging.getLogger("ubc.webhooks")

#: The first retry waits this many seconds; each next one twice as long, up to the cap.
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 3600.0
#: Entries one endpoint's task reads per query (and at most delivers per log write).
PAGE = 100
#: A run of deliveries is written to the log (and the cursor moved) at least this often.
FLUSH_SECONDS = 0.5
#: How often the leader looks for due endpoints (wall clock: it only decides how soon a
#: due delivery is noticed; whether it is due reads the ledger's clock).
POLL_SECONDS = 0.2
SECRET_PREFIX = "whsec_"
_MAX_ERROR = 300
_SECRET_RE = re.compile(r"[\x21-\x7e]{16,200}")


class WebhookEndpoint(SQLModel, table=True):
    """An endpoint the journal's entries are delivered to, and where its delivery stands."""

    __tablename__ = "webhook_endpoints"

    id: str = Field(sa_column=Column(String(40), primary_key=True))
    url: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    # The payload types delivered, space separated, sorted; empty: every entry.
    types: str = Field(default="", sa_column=Column(Text, nullable=False))
    secret: str = Field(sa_column=Column(Text, nullable=False))
    # "active" (delivering), "failing" (gave up after the retry window; a replay resumes).
    status: str = Field(default="active", sa_column=Column(String(16), nullable=False))
    # The next seq to consider: every matching entry below it was answered 2xx.
    cursor: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    # Failed attempts of the entry at the cursor so far, when the first one was, and when
    # the next one is due (the ledger's clock).
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    failing_since: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    next_attempt_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class WebhookDelivery(SQLModel, table=True):
    """One attempt to deliver one entry to one endpoint (the delivery log)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_id", "endpoint", "id"),
        Index("ix_webhook_deliveries_attempted_at", "attempted_at"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(Integer, primary_key=True, autoincrement=True)
    )
    endpoint: str = Field(sa_column=Column(String(40), nullable=False))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    attempt: int = Field(sa_column=Column(Integer, nullable=False))
    # The HTTP status of the answer, or None with ``error`` ("timeout: ...", ...).
    status_code: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    attempted_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    duration_ms: int = Field(sa_column=Column(Integer, nullable=False))


endpoints_t = table(WebhookEndpoint)
deliveries_t = table(WebhookDelivery)


# --- the contract: body and signature ------------------------------------------------------


def event_body(seq: int, type_: str, entry: bytes) -> bytes:
    """The body of a delivery: the JSON object of the SSE event's ``data``."""
    data: dict[str, Any] = {
        "seq": seq,
        "type": type_,
        "leaf_hash": base64.b64encode(leaf_hash(entry)).decode(),
        "entry": base64.b64encode(entry).decode(),
    }
    return json.dumps(data, separators=(",", ":")).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret`` (its UTF-8 bytes)."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<hex HMAC>``: the ``ubc-signature`` header of a delivery."""
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def new_secret() -> str:
    """A fresh endpoint secret: ``whsec_`` and 32 random bytes, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` cannot sign deliveries, or None."""
    if not _SECRET_RE.fullmatch(secret):
        return "a secret is 16 to 200 printable ASCII characters without spaces"
    return None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive deliveries, or None."""
    if len(url) > 2000:
        return "the URL is longer than 2000 characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"the URL is not valid: {exc}"
    if parts.scheme not in ("http", "https"):
        return "the URL must start with http:// or https://"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username or parts.password:
        return "the URL must not carry credentials (the secret signs each delivery)"
    if parts.fragment:
        return "the URL must not have a #fragment"
    if any(c.isspace() for c in url):
        return "the URL must not contain spaces"
    return None


def backoff_seconds(attempts: int, rng: random.Random | None = None) -> float:
    """The wait after the ``attempts``-th failure in a row: 1 s doubling to 1 h, times a
    jitter in [0.5, 1] (never more than the un-jittered wait)."""
    base = min(BACKOFF_FIRST * 2.0 ** max(attempts - 1, 0), BACKOFF_CAP)
    return base * (0.5 + 0.5 * (rng or random).random())


def types_of(value: str) -> tuple[str, ...]:
    return tuple(value.split()) if value else ()


# --- the delivery worker -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Endpoint:
    id: str
    url: str
    types: tuple[str, ...]
    secret: str
    cursor: int
    attempts: int
    failing_since: datetime | None


@dataclass(frozen=True, slots=True)
class _Attempt:
    ok: bool
    status_code: int | None
    error: str | None
    label: str
    duration_ms: int


@dataclass(frozen=True, slots=True)
class _Done:
    """One attempt, for the delivery log: the entry, the attempt, its number, its time."""

    seq: int
    attempt: _Attempt
    number: int
    at: datetime


class Deliverer:
    """The delivery worker of one server process (``app.state.webhooks``)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        engine: Engine,
        clock: Clock,
        timeout: float,
        retry_seconds: float,
        retention_seconds: float,
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.clock = clock
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.retention_seconds = retention_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rng = random.Random()
        #: Whether this process is the one delivering (tests and /metrics read it).
        self.leading = False
        self._last_prune = 0.0

    async def run(
        self, stop: asyncio.Event, leads: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """Until ``stop``: deliver while this process leads, as ``leads`` says at each round
        (the background jobs' leader lock; without it, always)."""
        # aiohttp rather than httpx: about a quarter of the CPU per request, which is what
        # bounds how many entries per second one endpoint follows (docs/events.md, 6).
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=4),
            skip_auto_headers=("User-Agent",),
        ) as client:
            try:
                while not stop.is_set():
                    try:
                        leading = leads is None or await leads()
                        if self.leading and not leading:
                            await self._drain()  # another process delivers from now on
                        self.leading = leading
                        if leading:
                            await self.tick(client)
                    except Exception:  # keep going; the next round retries
                        log.exception("webhook round failed")
                    wait = POLL_SECONDS if self.leading else 1.0
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=wait)
            finally:
                await self._drain()
                self.leading = False

    async def _drain(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def tick(self, client: aiohttp.ClientSession) -> None:
        """Start a task for each due endpoint that has none running."""
        now = self.clock.now()
        due, size = await asyncio.to_thread(self._due, now)
        for endpoint in due:
            running = self._tasks.get(endpoint.id)
            if running is not None and not running.done():
                continue
            self._tasks[endpoint.id] = asyncio.create_task(self._guarded(client, endpoint))
        for key in [k for k, t in self._tasks.items() if t.done()]:
            del self._tasks[key]
        if time.monotonic() - self._last_prune > 60:
            self._last_prune = time.monotonic()
            await asyncio.to_thread(self._prune, now)
        await asyncio.to_thread(self._gauge, size)

    def _due(self, now: datetime) -> tuple[list[_Endpoint], int]:
        with self.sessions() as session:
            size = store.latest_checkpoint(session)[0]
            t = endpoints_t
            rows = session.execute(
                select(t).where(
                    t.c.status == "active",
                    t.c.cursor < size,
                    (t.c.next_attempt_at.is_(None)) | (t.c.next_attempt_at <= now),
                )
            ).all()
        return [_row(r) for r in rows], size

    def _gauge(self, size: int) -> None:
        with self.sessions() as session:
            low = session.execute(
                select(func.min(endpoints_t.c.cursor)).where(endpoints_t.c.status == "active")
            ).scalar()
        metrics.WEBHOOK_LAG.set(max(size - int(low), 0) if low is not None else 0)

    def _prune(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self.retention_seconds)
        with self.sessions() as session, session.begin():
            session.execute(delete(deliveries_t).where(deliveries_t.c.attempted_at < cutoff))

    async def _guarded(self, client: aiohttp.ClientSession, endpoint: _Endpoint) -> None:
        try:
            await self._deliver(client, endpoint)
        except Exception:  # a database hiccup: the next tick starts again from the cursor
            log.exception("webhook %s: delivering failed", endpoint.id)

    async def _deliver(self, client: aiohttp.ClientSession, endpoint: _Endpoint) -> None:
        """Deliver ``endpoint``'s entries from its cursor on, in order, until it has none
        left or one fails (its retry is then scheduled).

        Entries are read a page at a time (up to :data:`PAGE`), and the delivery log's rows
        and the cursor are written for a *run* of deliveries in one transaction: at the end
        of each page, at the first failure, and at least every :data:`FLUSH_SECONDS`. A
        crash before that write only sends the run again (at least once)."""
        cursor, attempts, since = endpoint.cursor, endpoint.attempts, endpoint.failing_since
        while True:
            page, new_cursor = await asyncio.to_thread(self._page, endpoint, cursor)
            if not page:
                if new_cursor != cursor:
                    await asyncio.to_thread(self._skip, endpoint.id, cursor, new_cursor)
                return
            first = page[0][0]
            if first != cursor and not await asyncio.to_thread(
                self._skip, endpoint.id, cursor, first
            ):
                return  # replayed or removed meanwhile: the next tick starts afresh
            cursor = first
            run: list[_Done] = []
            flushed_at = time.monotonic()
            for seq, type_, entry in page:
                body = event_body(seq, type_, entry)
                now = self.clock.now()
                attempt = await self._post(client, endpoint, seq, body, now)
                attempts += 1
                metrics.WEBHOOK_DELIVERIES.labels(attempt.label).inc()
                if not attempt.ok:
                    if since is None:
                        since = now
                    failed = _Done(seq, attempt, attempts, now)
                    await asyncio.to_thread(self._record, endpoint, cursor, run, failed, since)
                    return
                run.append(_Done(seq, attempt, attempts, now))
                attempts, since = 0, None
                if time.monotonic() - flushed_at >= FLUSH_SECONDS:
                    if not await asyncio.to_thread(self._record, endpoint, cursor, run, None, None):
                        return
                    cursor, run, flushed_at = seq + 1, [], time.monotonic()
            if run:
                if not await asyncio.to_thread(self._record, endpoint, cursor, run, None, None):
                    return
                cursor = run[-1].seq + 1

    async def _post(
        self,
        client: aiohttp.ClientSession,
        endpoint: _Endpoint,
        seq: int,
        body: bytes,
        now: datetime,
    ) -> _Attempt:
        timestamp = int(now.timestamp())
        headers = {
            "content-type": "application/json",
            "user-agent": "ubc-webhooks",
            "ubc-event-id": str(seq),
            "ubc-signature": signature_header(endpoint.secret, timestamp, body),
        }
        started = time.perf_counter()
        try:
            async with client.post(
                endpoint.url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                status = answer.status
                text = "" if 200 <= status < 300 else (await answer.read()).decode(errors="replace")
        except TimeoutError as exc:
            return _Attempt(False, None, _error("timeout", exc), "timeout", _ms(started))
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _Attempt(False, None, _error("unreachable", exc), "unreachable", _ms(started))
        ok = 200 <= status < 300
        label = "ok" if ok else f"http_{status // 100}xx"
        error = None if ok else f"HTTP {status}: {text[:_MAX_ERROR]}"
        return _Attempt(ok, status, error, label, _ms(started))

    def _page(self, endpoint: _Endpoint, cursor: int) -> tuple[list[tuple[int, str, bytes]], int]:
        """Up to :data:`PAGE` entries at or after ``cursor`` the endpoint wants, in order;
        or none and the cursor past the entries read (none of which it wants)."""
        t = store.entries_t
        with self.sessions() as session:
            size = store.latest_checkpoint(session)[0]
            while cursor < size:
                # Windows of seqs, so that a filter matching few entries never scans far.
                end = min(cursor + PAGE * 10, size)
                query = select(t.c.seq, t.c.type, t.c.entry).where(t.c.seq >= cursor, t.c.seq < end)
                if endpoint.types:
                    query = query.where(t.c.type.in_(endpoint.types))
                rows = session.execute(query.order_by(t.c.seq).limit(PAGE)).all()
                if rows:
                    return [(int(r.seq), str(r.type), bytes(r.entry)) for r in rows], cursor
                cursor = end
        return [], cursor

    def _skip(self, endpoint: str, old: int, new: int) -> bool:
        """Move the cursor over entries the endpoint does not want (if still at ``old``)."""
        t = endpoints_t
        with self.sessions() as session, session.begin():
            done = session.execute(
                update(t)
                .where(t.c.id == endpoint, t.c.cursor == old, t.c.status == "active")
                .values(cursor=new)
            )
            return bool(getattr(done, "rowcount", 0))

    def _record(
        self,
        endpoint: _Endpoint,
        cursor: int,
        run: list[_Done],
        failed: _Done | None,
        since: datetime | None,
    ) -> bool:
        """In one transaction: log the attempts of ``run`` (delivered, in order) and of
        ``failed`` (the attempt that failed after them, if any); move the cursor past the
        run, and schedule the retry of ``failed``. The cursor moves only if it is still at
        ``cursor``: False if the endpoint moved meanwhile (replayed, removed), and the task
        stops."""
        t = endpoints_t
        attempts = [*run, failed] if failed is not None else list(run)
        if not attempts:
            return True
        with self.sessions() as session, session.begin():
            session.execute(
                deliveries_t.insert(),
                [
                    {
                        "endpoint": endpoint.id,
                        "seq": done.seq,
                        "attempt": done.number,
                        "status_code": done.attempt.status_code,
                        "error": done.attempt.error,
                        "attempted_at": done.at,
                        "duration_ms": done.attempt.duration_ms,
                    }
                    for done in attempts
                ],
            )
            values: dict[str, Any]
            if failed is None:
                values = {
                    "cursor": run[-1].seq + 1,
                    "attempts": 0,
                    "failing_since": None,
                    "next_attempt_at": None,
                    "last_error": None,
                }
            else:
                assert since is not None
                now = failed.at
                values = {
                    "cursor": failed.seq,
                    "attempts": failed.number,
                    "failing_since": since,
                    "next_attempt_at": now
                    + timedelta(seconds=backoff_seconds(failed.number, self._rng)),
                    "last_error": failed.attempt.error,
                }
                if (now - since).total_seconds() >= self.retry_seconds:
                    values["status"] = "failing"
                    log.warning(
                        "webhook %s: seq %d failed for %s; the endpoint is marked failing "
                        "(a replay resumes it)",
                        endpoint.id,
                        failed.seq,
                        now - since,
                        extra={"fields": {"webhook": endpoint.id, "seq": failed.seq}},
                    )
            done = session.execute(
                update(t)
                .where(t.c.id == endpoint.id, t.c.cursor == cursor, t.c.status == "active")
                .values(**values)
            )
            return bool(getattr(done, "rowcount", 0))


def _row(row: Any) -> _Endpoint:
    return _Endpoint(
        id=str(row.id),
        url=str(row.url),
        types=types_of(str(row.types)),
        secret=str(row.secret),
        cursor=int(row.cursor),
        attempts=int(row.attempts),
        failing_since=row.failing_since,
    )


def _ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _error(kind: str, exc: Exception) -> str:
    return f"{kind}: {type(exc).__name__}: {str(exc)[:_MAX_ERROR]}".rstrip(": ")


def normalise_types(types: Iterable[str]) -> str:
    return " ".join(sorted(set(types)))
