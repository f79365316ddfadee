"""Leader locks for background jobs: with several processes or hosts on one database, each
background job (the hold sweeper, the epoch worker, ...) runs in one process at a time.

Every process runs every job's loop; at the start of each round the loop asks
:meth:`Leaders.lead` whether it leads that job, and does the round only if it does::

    leaders = Leaders(engine)                   # one per process (the app's lifespan)
    while not stop.is_set():
        if await leaders.lead("hold-sweep"):    # or: async with leaders.leading(job) as leading
            await asyncio.to_thread(sweep_once, app)
        await pause(interval)
    await leaders.aclose()                      # steps down: another process takes over

How, per engine:

- **PostgreSQL**: a session-level advisory lock (``pg_try_advisory_lock``) per job, with a
  key derived from the job's name (:func:`lock_key`), taken on a connection of its own
  (not the pool's) that the process keeps open while it leads. Whoever holds the lock
  leads; the others try again at their next round. When the leader's process dies or its
  connection drops, PostgreSQL ends its session, which releases the lock, and another
  process takes over at its next round. The connection sets TCP keepalives on both
  sides, so that a host that vanishes (power off, partition) is noticed in about half a
  minute rather than the system's two hours. A leader checks its connection at every round
  (one ``SELECT 1``): a lost connection means lost leadership.
- **SQLite** (one host): an exclusive ``flock`` of a small file beside the database file
  (``<database>-leader-<job>``, beside SQLite's ``-wal`` and ``-shm``), held while
  leading: the worker processes of ``ubc serve --workers N`` (and several apps in one
  process) lead in turn, and the lock is released when its process exits. An in-memory
  database always leads.

Leadership is what keeps a job from running twice at once; the jobs themselves remain
correct if it ever happens (every write they make takes the same row locks as any
other), so a short overlap when a dead leader's lock is released late costs only
duplicated work. Gaining and losing leadership is logged and exposed as the gauge
``ubc_background_leader{job}`` (:mod:`ubc.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import psycopg
from sqlalchemy import Engine

from ubc import metrics

log = logging.getLogger("ubc.leader")

#: The namespace of ubc's advisory lock keys (so that other software's advisory locks on
#: the same database do not collide with them by accident).
KEY_NAMESPACE = "ubc.leader:"
# libpq's TCP settings of the leader connection: a dead peer is noticed in ~25-30 s.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms: unacknowledged data (a query to a vanished server)
}
# The server's side of the same: it drops the session of a vanished leader host, which
# releases its locks. (Settable by any user, per session.)
_SERVER_KEEPALIVES = (
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
    "SET idle_session_timeout = 0",
    "SET idle_in_transaction_session_timeout = 0",
)


def lock_key(job: str) -> int:
    """The advisory lock key of ``job``: a signed 64-bit integer from its name, the same
    in every process and version."""
    digest = hashlib.sha256((KEY_NAMESPACE + job).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leaders:
    """The leader locks of one process's background jobs on ``engine``'s database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._mutex = threading.Lock()  # jobs ask from their own threads
        self._leading: dict[str, bool] = {}
        self._closed = False
        self._backend: _Backend
        database = engine.url.database
        if engine.dialect.name == "postgresql":
            self._backend = _Postgres(engine)
        elif database and database != ":memory:":
            self._backend = _FileLocks(Path(database))
        else:
            self._backend = _Always()

    def lead_now(self, job: str) -> bool:
        """Whether this process leads ``job`` now: keeps leadership if it had it (and its
        lock is still held), else tries to take it. Blocking (a round trip on PostgreSQL);
        never raises: an unreachable database means not leading."""
        with self._mutex:
            if self._closed:
                return False
            try:
                leading = self._backend.hold(job)
            except Exception:  # an unexpected error: not leading this round
                log.exception("leader lock of %s: checking it failed", job)
                self._backend.lost()
                leading = False
            # A lost connection loses every job it led, not only this one.
            for other, was in list(self._leading.items()):
                if was and other != job and not self._backend.holding(other):
                    self._changed(other, False)
            self._changed(job, leading)
            return leading

    async def lead(self, job: str) -> bool:
        """:meth:`lead_now` off the event loop."""
        return await asyncio.to_thread(self.lead_now, job)

    @contextlib.asynccontextmanager
    async def leading(self, job: str) -> AsyncIterator[bool]:
        """``async with leaders.leading("job") as leading:``: one round of ``job``, which
        does its work if ``leading``."""
        yield await self.lead(job)

    def is_leading(self, job: str) -> bool:
        """Whether this process led ``job`` at its last round (no database round trip)."""
        return self._leading.get(job, False)

    def close(self) -> None:
        """Step down from every job (releasing the locks) and ask no more."""
        with self._mutex:
            self._closed = True
            for job, was in list(self._leading.items()):
                if was:
                    self._changed(job, False, reason="stopping")
            self._backend.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _changed(self, job: str, leading: bool, *, reason: str = "") -> None:
        before = self._leading.get(job)
        self._leading[job] = leading
        metrics.set_leader(job, leading)
        if before == leading or (before is None and not leading):
            return
        if leading:
            log.info(
                "leading background job %s (took its leader lock)",
                job,
                extra={"fields": {"job": job, "leader": True}},
            )
        else:
            log.log(
                logging.INFO if reason else logging.WARNING,
                "no longer leading background job %s (%s)",
                job,
                reason or "its leader lock was lost",
                extra={"fields": {"job": job, "leader": False}},
            )


class _Backend:
    def hold(self, job: str) -> bool:
        """Keep or take ``job``'s lock: whether it is held now."""
        raise NotImplementedError

    def holding(self, job: str) -> bool:
        """Whether ``job``'s lock is held, as far as known without asking the database."""
        raise NotImplementedError

    def lost(self) -> None:
        """After an error: forget whatever may no longer be held."""

    def close(self) -> None:
        """Release every lock."""


class _Always(_Backend):
    """An in-memory SQLite database: nobody else can see it, so this process leads."""

    def hold(self, job: str) -> bool:
        return True

    def holding(self, job: str) -> bool:
        return True


class _Postgres(_Backend):
    """Session-level advisory locks on one connection of the process's own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.connection: psycopg.Connection[Any] | None = None
        self.held: set[str] = set()
        self.unreachable = False

    def _connect(self) -> psycopg.Connection[Any]:
        url = self.engine.url.set(drivername="postgresql")
        connection = psycopg.connect(
            url.render_as_string(hide_password=False),
            autocommit=True,
            connect_timeout=10,
            application_name="ubc leader lock",
            **_KEEPALIVES,  # type: ignore[arg-type]
        )
        for statement in _SERVER_KEEPALIVES:
            connection.execute(statement)
        return connection

    def hold(self, job: str) -> bool:
        try:
            if self.connection is not None and job in self.held:
                self.connection.execute("SELECT 1")  # the session, and so the lock, lives
                return True
            if self.connection is None or self.connection.closed:
                self.connection = self._connect()
            row = self.connection.execute(
                "SELECT pg_try_advisory_lock(%s)", (lock_key(job),)
            ).fetchone()
        except psycopg.Error as exc:
            # Unreachable, restarting, or the connection dropped: whatever this session
            # held is released by PostgreSQL; try again next round on a new connection.
            if not self.unreachable:
                log.warning("leader locks: the database cannot be reached (%s)", exc)
            self.unreachable = True
            self.lost()
            return False
        self.unreachable = False
        if row is not None and row[0]:
            self.held.add(job)
            return True
        return False

    def holding(self, job: str) -> bool:
        return job in self.held

    def lost(self) -> None:
        connection, self.connection = self.connection, None
        self.held.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        # Released now, before the session ends (which releases them too, but a moment
        # after the connection closes): the next leader can take them at once.
        if self.connection is not None and self.held:
            with contextlib.suppress(psycopg.Error):
                self.connection.execute("SELECT pg_advisory_unlock_all()")
        self.lost()


class _FileLocks(_Backend):
    """``flock`` of one file per job beside the SQLite database file."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.files: dict[str, IO[bytes]] = {}

    def hold(self, job: str) -> bool:
        if job in self.files:
            return True
        path = self.database.with_name(f"{self.database.name}-leader-{job}")
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        file = os.fdopen(descriptor, "r+b")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        except BaseException:
            file.close()
            raise
        self.files[job] = file
        return True

    def holding(self, job: str) -> bool:
        return job in self.files

    def close(self) -> None:
        for file in self.files.values():
            file.close()  # releases the flock
        self.files.clear()
