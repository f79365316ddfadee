"""The ledger side of C2SP ``tlog-witness``: ask the witnesses to cosign, keep what they sign.

The ledger is configured with witnesses (``UBC_WITNESSES``: ``<vkey>@<url>``, comma
separated). A background task of the server (:meth:`WitnessRounds.run`) runs *rounds*:
when the journal's latest checkpoint is one some witness has not cosigned yet, and no
round started in the last ``UBC_WITNESS_INTERVAL_SECONDS`` (the ledger's clock), it sends
each such witness, in parallel, ``POST <url>/add-checkpoint`` with ``old <size>`` (the
witness's size as last known, 0 at first), the RFC 9162 consistency proof from that size
and the checkpoint. Answers:

- **200**: the cosignature line(s). The line of the witness's key is verified
  (:class:`~ubc.witness.cosignature.CosignatureVerifier`) before it is stored; a line that
  does not verify, or no line of its key, is refused and logged (``bad_cosignature``).
- **409** with ``Content-Type: text/x.tlog.size``: the witness is at another size; the
  request is sent once more from that size (with the proof from it). A size beyond the
  ledger's is an error (``ahead``: the witness saw a larger tree of this origin).
- anything else, a timeout, a refused connection: logged, counted, and retried at the
  next round. Nothing of this touches the write path: the rounds run in their own task,
  and the HTTP calls are asynchronous with a timeout (``UBC_WITNESS_TIMEOUT_SECONDS``).

Only one round runs at a time: in-process a lock, across the processes of one database
the background jobs' leader lock (job ``witness-round``, :mod:`ubc.db.leader`: a
PostgreSQL advisory lock or a file lock on SQLite), and the interval is a
compare-and-swap on the single row of ``journal_witness_rounds``, so several ``ubc
serve`` processes together still run at most one round per interval, even while a
vanished leader is being noticed.

Documentation: docs/witness.md, section 8.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from ubc import metrics
from ubc.clock import Clock
from ubc.journal import store
from ubc.journal.cosignatures import (
    WitnessInfo,
    Witnessing,
    body_of,
    cosignatures_t,
    cosigned_lines,
    rounds_t,
    witness_rows,
    witnessed_size,
    witnesses_t,
)
from ubc.journal.merkle import consistency_proof
from ubc.signing.note import NoteError
from ubc.witness.cosignature import CosignatureVerifier
from ubc.witness.protocol import SIZE_CONTENT_TYPE, format_add_checkpoint

__all__ = [
    "Outcome",
    "WitnessEndpoint",
    "WitnessRounds",
    "parse_witnesses",
    "witnessing_of",
]

log = logging.getLogger("ubc.witness")

_DECIMAL_RE = re.compile(r"(0|[1-9][0-9]{0,18})\n?", re.ASCII)
_MAX_ERROR = 300

# Outcomes (the status column of journal_witnesses, and the label of the request counter).
COSIGNED = "cosigned"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
BAD_COSIGNATURE = "bad_cosignature"
AHEAD = "ahead"
CONFLICT = "conflict"


@dataclass(frozen=True)
class WitnessEndpoint:
    """A witness the ledger asks: its verifier (name and key) and its base URL."""

    verifier: CosignatureVerifier
    url: str

    @property
    def name(self) -> str:
        return self.verifier.name

    @property
    def vkey(self) -> str:
        return self.verifier.vkey

    @property
    def public_url(self) -> str:
        """The URL without any user or password, for status pages and logs."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_witnesses(value: str) -> tuple[WitnessEndpoint, ...]:
    """``UBC_WITNESSES``: ``<vkey>@<url>`` items separated by commas (blank: none).

    Raises ``ValueError`` naming what is wrong: an item without ``@``, a vkey that is not
    a valid cosignature vkey (type 0x04), a URL that is not http(s)://host..., or two
    witnesses sharing a key (one key is one witness).
    """
    endpoints: list[WitnessEndpoint] = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        vkey, sep, url = item.partition("@")
        if not sep or not vkey or not url:
            raise ValueError(f"UBC_WITNESSES: {item!r} is not <vkey>@<url>")
        try:
            verifier = CosignatureVerifier.from_vkey(vkey)
        except NoteError as exc:
            raise ValueError(f"UBC_WITNESSES: the vkey {vkey!r}: {exc}") from None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - a bad port raises here
        except ValueError as exc:
            raise ValueError(f"UBC_WITNESSES: the URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"UBC_WITNESSES: the URL {url!r} is not http(s)://host[:port][/path]")
        if parts.query or parts.fragment:
            raise ValueError(f"UBC_WITNESSES: the URL {url!r} has a query or a fragment")
        for other in endpoints:
            if other.verifier.public_key == verifier.public_key:
                raise ValueError(
                    f"UBC_WITNESSES: {other.vkey} and {verifier.vkey} have the same key: "
                    "one key is one witness"
                )
        endpoints.append(WitnessEndpoint(verifier, url.rstrip("/")))
    return tuple(endpoints)


def witnessing_of(
    endpoints: tuple[WitnessEndpoint, ...], quorum: int | None, interval: float
) -> Witnessing:
    """What the routes show of the configuration; ``quorum`` defaults to all witnesses.

    Raises ``ValueError`` when the quorum is more than the number of witnesses.
    """
    wanted = len(endpoints) if quorum is None else quorum
    if endpoints and not 1 <= wanted <= len(endpoints):
        raise ValueError(
            f"UBC_WITNESS_QUORUM is {quorum}, more than the {len(endpoints)} witnesses of "
            "UBC_WITNESSES"
        )
    infos = tuple(WitnessInfo(e.name, e.vkey, e.public_url) for e in endpoints)
    return Witnessing(infos, max(wanted, 1), interval)


@dataclass(frozen=True)
class Outcome:
    """What one witness answered in a round."""

    endpoint: WitnessEndpoint
    status: str
    size: int | None = None  # the witness's size as learned (200: the cosigned one; 409)
    line: str | None = None  # the verified cosignature line (without its newline)
    timestamp: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == COSIGNED


@dataclass(frozen=True)
class _Plan:
    size: int
    checkpoint: str
    known: dict[str, int]  # vkey -> the witness's size as last known
    todo: tuple[WitnessEndpoint, ...]


class WitnessRounds:
    """Runs witness rounds for one server process (``app.state.witness_rounds``)."""

    def __init__(
        self,
        endpoints: tuple[WitnessEndpoint, ...],
        *,
        quorum: int,
        interval: float,
        timeout: float,
        sessions: sessionmaker[Session],
        engine: Engine,
        clock: Clock,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.quorum = quorum
        self.interval = interval
        self.timeout = timeout
        self.sessions = sessions
        self.engine = engine
        self.clock = clock
        self._transport = transport
        self._lock = threading.Lock()
        # The HTTP client of :meth:`run`, kept for the life of the task (its keep-alive
        # connections to the witnesses are reused from round to round).
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @property
    def vkeys(self) -> tuple[str, ...]:
        return tuple(e.vkey for e in self.endpoints)

    # --- the background task ---------------------------------------------------------

    async def run(
        self, stop: asyncio.Event, leads: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """Until ``stop``: a round whenever one is due (checked every second at most), in
        the process that ``leads`` (the leader lock's answer; without it, always)."""
        poll = min(self.interval, 1.0)
        async with self._new_client() as client:
            self._client, self._client_loop = client, asyncio.get_running_loop()
            try:
                while not stop.is_set():
                    try:
                        if leads is None or await leads():
                            await self.tick()
                    except Exception:  # keep going; the next round retries
                        log.exception("witness round failed")
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=poll)
            finally:
                self._client = self._client_loop = None

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self.timeout, transport=self._transport, follow_redirects=False
        )

    def tick_blocking(self) -> str:
        """:meth:`tick` from a thread without an event loop (tests, tools)."""
        return asyncio.run(self.tick())

    async def tick(self) -> str:
        """One round if one is due: ``done`` (a round ran), ``idle`` (every witness has
        cosigned the latest checkpoint), ``not_due`` (a round started less than the
        interval ago, here or in another process), ``busy`` (another round is running in
        this process)."""
        if not self.endpoints:
            return "idle"
        if not self._lock.acquire(blocking=False):
            return "busy"
        try:
            plan = await asyncio.to_thread(self._plan)
            if plan is None:
                return "idle"
            now = self.clock.now()
            if not await asyncio.to_thread(self._claim, now):
                return "not_due"
            started = time.perf_counter()
            outcomes = await self._round(plan)
            await asyncio.to_thread(self._record, plan, outcomes, now)
            self._log_round(plan, outcomes, started)
            return "done"
        finally:
            self._lock.release()

    # --- one round -------------------------------------------------------------------

    async def _round(self, plan: _Plan) -> list[Outcome]:
        """Ask every witness of the plan at once, on :meth:`run`'s client (a client of
        its own when :meth:`tick` is called outside of it: tests, tools)."""
        client = self._client
        if client is not None and self._client_loop is asyncio.get_running_loop():
            return await self._ask_all(client, plan)
        async with self._new_client() as client:
            return await self._ask_all(client, plan)

    async def _ask_all(self, client: httpx.AsyncClient, plan: _Plan) -> list[Outcome]:
        return list(
            await asyncio.gather(
                *(
                    self._ask(client, endpoint, plan, plan.known.get(endpoint.vkey, 0))
                    for endpoint in plan.todo
                )
            )
        )

    async def _ask(
        self, client: httpx.AsyncClient, endpoint: WitnessEndpoint, plan: _Plan, old: int
    ) -> Outcome:
        """add-checkpoint from ``old``; once more from the witness's size after a 409."""
        learned: int | None = None
        if old > plan.size:
            old = 0  # known to be ahead: ask again, its 409 says where it is now
        for attempt in (1, 2):
            if old > plan.size:
                return Outcome(
                    endpoint,
                    AHEAD,
                    size=old,
                    error=f"the witness is at size {old}, beyond the ledger's {plan.size}",
                )
            try:
                proof = await asyncio.to_thread(self._proof, old, plan.size)
                body = format_add_checkpoint(old, proof, plan.checkpoint)
                answer = await client.post(
                    f"{endpoint.url}/add-checkpoint",
                    content=body.encode("utf-8"),
                    headers={"Content-Type": "text/plain; charset=utf-8"},
                )
            except httpx.TimeoutException as exc:
                return self._failed(endpoint, TIMEOUT, f"timed out: {exc!r}", learned)
            except httpx.HTTPError as exc:
                return self._failed(endpoint, UNREACHABLE, f"{type(exc).__name__}: {exc}", learned)
            status = str(answer.status_code)
            if answer.status_code == 200:
                return self._cosigned(endpoint, plan, answer.text)
            metrics.WITNESS_REQUESTS.labels(endpoint.name, status).inc()
            size = _size_answer(answer)
            if answer.status_code == 409 and size is not None:
                learned = size
                if attempt == 1 and size != old:
                    old = size
                    continue
            reason = answer.text.strip().splitlines()[0] if answer.text.strip() else ""
            return Outcome(
                endpoint,
                # 409 without a size: the witness cosigned another tree of this size.
                CONFLICT if answer.status_code == 409 and size is None else f"http_{status}",
                size=learned,
                error=f"{status}: {reason[:_MAX_ERROR]}" if reason else status,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _failed(endpoint: WitnessEndpoint, status: str, error: str, size: int | None) -> Outcome:
        metrics.WITNESS_REQUESTS.labels(endpoint.name, status).inc()
        return Outcome(endpoint, status, size=size, error=error[:_MAX_ERROR])

    @staticmethod
    def _cosigned(endpoint: WitnessEndpoint, plan: _Plan, answer: str) -> Outcome:
        """The witness's line among those answered, verified on the checkpoint's body."""
        body = body_of(plan.checkpoint)
        found = None
        try:
            for line in answer.splitlines():
                if not line:
                    continue
                cosignature = endpoint.verifier.verify_line(body, line)
                if cosignature is not None and (
                    found is None or cosignature.timestamp > found.timestamp
                ):
                    found = cosignature
        except NoteError as exc:
            metrics.WITNESS_REQUESTS.labels(endpoint.name, BAD_COSIGNATURE).inc()
            return Outcome(endpoint, BAD_COSIGNATURE, error=str(exc)[:_MAX_ERROR])
        if found is None:
            metrics.WITNESS_REQUESTS.labels(endpoint.name, BAD_COSIGNATURE).inc()
            return Outcome(
                endpoint, BAD_COSIGNATURE, error="the answer has no cosignature of its key"
            )
        metrics.WITNESS_REQUESTS.labels(endpoint.name, "200").inc()
        return Outcome(
            endpoint, COSIGNED, size=plan.size, line=found.line, timestamp=found.timestamp
        )

    def _log_round(self, plan: _Plan, outcomes: list[Outcome], started: float) -> None:
        elapsed = round((time.perf_counter() - started) * 1000, 3)
        for outcome in outcomes:
            if not outcome.ok:
                log.warning(
                    "witness %s did not cosign size %d: %s",
                    outcome.endpoint.name,
                    plan.size,
                    outcome.error,
                    extra={
                        "fields": {
                            "job": "witness round",
                            "witness": outcome.endpoint.name,
                            "status": outcome.status,
                            "size": plan.size,
                        }
                    },
                )
        cosigned = sum(1 for o in outcomes if o.ok)
        log.info(
            "witness round: size %d cosigned by %d of %d witnesses asked in %.1f ms",
            plan.size,
            cosigned,
            len(outcomes),
            elapsed,
            extra={
                "fields": {
                    "job": "witness round",
                    "size": plan.size,
                    "asked": len(outcomes),
                    "cosigned": cosigned,
                    "ms": elapsed,
                }
            },
        )

    # --- the database ----------------------------------------------------------------

    def _plan(self) -> _Plan | None:
        """The latest checkpoint and the witnesses that have not cosigned it."""
        with self.sessions() as session:
            size, checkpoint = store.latest_checkpoint(session)
            if not checkpoint or size == 0:
                return None
            done = set(cosigned_lines(session, size, checkpoint, self.vkeys))
            rows = witness_rows(session, self.vkeys)
        todo = tuple(e for e in self.endpoints if e.vkey not in done)
        if not todo:
            return None
        known = {
            vkey: int(row["size"]) for vkey, row in rows.items() if row.get("size") is not None
        }
        return _Plan(size, checkpoint, known, todo)

    def _claim(self, now: datetime) -> bool:
        """Start a round at ``now`` unless one started less than the interval ago."""
        with self.sessions() as session, session.begin():
            last = session.execute(select(rounds_t.c.started_at).where(rounds_t.c.id == 1)).scalar()
            if last is None:
                result = session.execute(
                    _insert(session, rounds_t)
                    .values(id=1, started_at=now)
                    .on_conflict_do_nothing(index_elements=["id"])
                    .returning(rounds_t.c.id)
                )
                return result.first() is not None
            cutoff = now - timedelta(seconds=self.interval)
            result = session.execute(
                update(rounds_t)
                .where(rounds_t.c.id == 1, rounds_t.c.started_at == last)
                .where((rounds_t.c.started_at <= cutoff) | (rounds_t.c.started_at > now))
                .values(started_at=now)
                .returning(rounds_t.c.id)
            )
            return result.first() is not None

    def _proof(self, old: int, new: int) -> list[bytes]:
        if old == 0 or old == new:
            return []
        with self.sessions() as session:
            return consistency_proof(old, new, store.HashTable(session))

    def _record(self, plan: _Plan, outcomes: list[Outcome], now: datetime) -> None:
        """Store the verified cosignatures and every witness's status; prune the rows
        below the largest size a quorum cosigned (nothing serves them any more)."""
        with self.sessions() as session, session.begin():
            for outcome in outcomes:
                vkey = outcome.endpoint.vkey
                values: dict[str, Any] = {
                    "attempted_at": now,
                    "status": outcome.status,
                    "error": outcome.error,
                }
                if outcome.size is not None:
                    values["size"] = outcome.size
                if outcome.ok:
                    assert outcome.line is not None
                    assert outcome.timestamp is not None
                    values["succeeded_at"] = now
                    values["cosigned_size"] = plan.size
                    cosignature = {
                        "checkpoint": plan.checkpoint,
                        "line": outcome.line,
                        "timestamp": outcome.timestamp,
                        "created_at": now,
                    }
                    session.execute(
                        _insert(session, cosignatures_t)
                        .values(size=plan.size, witness=vkey, **cosignature)
                        .on_conflict_do_update(index_elements=["size", "witness"], set_=cosignature)
                    )
                session.execute(
                    _insert(session, witnesses_t)
                    .values(witness=vkey, **values)
                    .on_conflict_do_update(index_elements=["witness"], set_=values)
                )
            # Witnesses no longer configured: their status rows go (their cosignatures
            # stop counting, as the routes only read the configured ones).
            session.execute(delete(witnesses_t).where(witnesses_t.c.witness.not_in(self.vkeys)))
            floor = witnessed_size(session, self.vkeys, self.quorum)
            if floor is not None:
                session.execute(delete(cosignatures_t).where(cosignatures_t.c.size < floor))


def _insert(session: Session, table: Any) -> Any:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _size_answer(answer: httpx.Response) -> int | None:
    """The size of a 409 ``text/x.tlog.size`` answer, else None."""
    media = answer.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != SIZE_CONTENT_TYPE:
        return None
    match = _DECIMAL_RE.fullmatch(answer.text)
    return int(match.group(1)) if match else None
