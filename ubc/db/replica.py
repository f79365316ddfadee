"""A PostgreSQL read replica (``UBC_READ_DATABASE_URL``): where a read may go, and how far
behind the primary it is.

The replica is a streaming standby of the primary. A read goes to it unless it asks for a
journal size the replica has not replayed yet (read-your-writes: every write answers the
journal size it produced) or the replica cannot be reached; then the primary serves it.
A replica found unreachable is left alone for :data:`RETRY_DOWN_S` seconds, so that reads
do not each wait for a connection to fail.

The journal size (``journal_head.size``) is written in the same transaction as every
entry's effects: a replica that has replayed size N shows every effect of the first N
entries, and, being a replica, never goes back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ubc.db import DATABASE_ERRORS, is_sqlite, make_engine, make_session_factory
from ubc.dbtypes import UTCDateTime
from ubc.dburl import normalise_database_url

log = logging.getLogger("ubc")

#: A replica found unreachable is tried again after this many seconds (meanwhile the
#: primary serves its reads).
RETRY_DOWN_S = 5.0
#: A new connection to the replica fails after this long (the primary's: 10 s): a read
#: then falls back to the primary instead of waiting.
CONNECT_TIMEOUT_S = 2

_SIZE = text("SELECT size FROM journal_head WHERE id = 1")
# On the replica: whether it is a standby, its journal size, whether replay is paused, and
# how far replay is behind: 0 when it has replayed all it received, else the age of the
# latest transaction it replayed (pg_last_xact_replay_timestamp). That is an upper bound:
# after a quiet hour, one transaction not yet replayed shows an hour for a moment.
_STATUS = text(
    "SELECT pg_is_in_recovery() AS standby, "
    "(SELECT size FROM journal_head WHERE id = 1) AS size, "
    "CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END AS paused, "
    "CASE WHEN NOT pg_is_in_recovery() THEN 0.0 "
    "WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0.0 "
    "ELSE extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 "
    "END AS replay_lag_seconds"
)
# On the primary: when the first entry the replica lacks was committed.
_COMMITTED = text("SELECT committed_at FROM journal_entries WHERE seq = :seq").columns(
    committed_at=UTCDateTime()
)


class Route(StrEnum):
    """Where a read went, and why."""

    REPLICA = "replica"
    BEHIND = "behind"  # the replica had not replayed the journal size asked for
    DOWN = "down"  # the replica could not be reached (now or within RETRY_DOWN_S)


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """The replica as seen now (``/readyz``, ``/metrics``)."""

    up: bool
    standby: bool = False
    paused: bool = False
    size: int | None = None
    primary_size: int | None = None
    #: How long ago (the ledger's clock) the oldest entry the replica lacks was committed:
    #: how stale a read of the replica may be; 0 when it lacks none.
    lag_seconds: float | None = None
    #: PostgreSQL's replay lag (see ``_STATUS``): also counts writes that are not journal
    #: entries (holds, the readiness probe), and overstates after a quiet period.
    replay_lag_seconds: float | None = None
    error: str | None = None

    @property
    def lag_entries(self) -> int | None:
        """Journal entries the primary has and the replica has not replayed yet."""
        if self.size is None or self.primary_size is None:
            return None
        return max(0, self.primary_size - self.size)

    def to_json(self) -> dict[str, object]:
        """The ``replica`` field of ``/readyz``."""
        if not self.up:
            return {"status": "down", "reason": self.error or "unreachable"}
        body: dict[str, object] = {
            "status": "paused" if self.paused else "lagging" if self.lag_entries else "ok"
        }
        measured = {
            "lag_entries": self.lag_entries,
            "lag_seconds": _rounded(self.lag_seconds),
            "replay_lag_seconds": _rounded(self.replay_lag_seconds),
        }
        body.update((name, value) for name, value in measured.items() if value is not None)
        if not self.standby:
            body["warning"] = "UBC_READ_DATABASE_URL is not a standby (not in recovery)"
        return body


class ReadReplica:
    """The replica's engine and sessions, and whether it is believed reachable."""

    def __init__(self, url: str, *, primary: Engine, pool_size: int = 10) -> None:
        url = normalise_database_url(url)
        if is_sqlite(url) or primary.dialect.name != "postgresql":
            raise ValueError(
                "UBC_READ_DATABASE_URL must be a PostgreSQL URL (a streaming replica of the "
                "PostgreSQL database of UBC_DATABASE_URL)"
            )
        self.url = make_url(url).render_as_string(hide_password=True)
        self.primary = primary
        self.engine = make_engine(
            url, readonly=True, pool_size=pool_size, connect_timeout=CONNECT_TIMEOUT_S
        )
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine, retry_reads=True)
        #: Seconds a replica found unreachable is left alone (tests shorten it).
        self.retry_down = RETRY_DOWN_S
        self._down_until = 0.0
        self._lock = threading.Lock()

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def believed_down(self) -> bool:
        return time.monotonic() < self._down_until

    def open(self, min_size: int | None) -> tuple[Session | None, Route]:
        """A session on the replica for a read that needs journal size ``min_size`` (None:
        any), or None and why the primary must serve it instead."""
        if self.believed_down:
            return None, Route.DOWN
        session = self.sessions()
        try:
            # The first statement connects (and checks the replica is there).
            size = int(session.execute(_SIZE).scalar_one())
        except DATABASE_ERRORS as exc:
            session.close()
            self._mark_down(exc)
            return None, Route.DOWN
        self._mark_up()
        if min_size is not None and size < min_size:
            session.close()
            return None, Route.BEHIND
        return session, Route.REPLICA

    def status(self, now: datetime) -> ReplicaStatus:
        """The replica's state and lag at ``now`` (the ledger's clock): a query on the
        replica, one or two on the primary."""
        try:
            with self.engine.connect() as connection:
                row = connection.execute(_STATUS).one()
        except DATABASE_ERRORS as exc:
            self._mark_down(exc)
            return ReplicaStatus(up=False, error=_describe(exc))
        self._mark_up()
        size = None if row.size is None else int(row.size)
        primary_size: int | None = None
        lag: float | None = None
        try:
            with self.primary.connect() as connection:
                primary_size = int(connection.execute(_SIZE).scalar_one())
                if size is not None and size >= primary_size:
                    lag = 0.0
                elif size is not None:
                    committed = connection.execute(_COMMITTED, {"seq": size}).scalar()
                    if isinstance(committed, datetime):
                        lag = max(0.0, (now - committed).total_seconds())
        except DATABASE_ERRORS:
            primary_size = None  # the primary's own problem: /readyz says it elsewhere
        replay = row.replay_lag_seconds
        return ReplicaStatus(
            up=True,
            standby=bool(row.standby),
            paused=bool(row.paused),
            size=size,
            primary_size=primary_size,
            lag_seconds=lag,
            replay_lag_seconds=None if replay is None else max(0.0, float(replay)),
        )

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            was_up = self._down_until == 0.0
            self._down_until = time.monotonic() + self.retry_down
        if was_up:
            log.warning(
                "read replica %s unreachable, reads go to the primary: %s",
                self.url,
                _describe(exc),
            )

    def _mark_up(self) -> None:
        if self._down_until == 0.0:
            return
        with self._lock:
            self._down_until = 0.0
        log.warning("read replica %s reachable again", self.url)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"
