"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production).

SQLite runs in WAL mode with ``synchronous=FULL`` so a committed transfer survives
power loss, and every write transaction starts with ``BEGIN IMMEDIATE`` so writers
queue on the database lock up front instead of failing on upgrade. PostgreSQL runs
at READ COMMITTED; the ledger takes row locks in one sorted order (see
``ubc.ledger.service``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    readonly: bool = False,
    durable: bool = True,
    lazy_commit: bool = False,
) -> Engine:
    """The engine for ``url`` with the pragmas and isolation ubc relies on.

    A ``readonly`` SQLite engine starts deferred transactions, so that readers see a
    snapshot under WAL without queueing behind writers. ``durable=False`` is only for
    scratch databases (the auditor's replay), which nothing needs after a crash.

    ``lazy_commit`` commits without waiting for the disk (PostgreSQL's
    ``synchronous_commit = off``, SQLite's ``synchronous = NORMAL`` under WAL): atomic,
    isolated and visible at once, but the last commits may be lost in a power failure,
    never half-applied, and a later durable commit makes every earlier one durable. The
    model endpoint's holds use it: a hold lost in a crash belonged to a call the crash
    ended anyway.
    """
    if is_sqlite(url):
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        _configure_sqlite(
            engine,
            begin="BEGIN" if readonly else "BEGIN IMMEDIATE",
            synchronous="OFF" if not durable else "NORMAL" if lazy_commit else "FULL",
        )
        return engine
    return create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No ping per checkout (a round trip per transaction); stale connections are
        # recycled instead, and the writer's unit of work retries nothing by itself.
        pool_pre_ping=False,
        pool_recycle=1800,
        isolation_level="READ COMMITTED",
        # psycopg prepares a statement after 5 runs, and PostgreSQL may then keep a
        # generic plan chosen while tables were small (a sequential scan) as they grow.
        connect_args={
            "prepare_threshold": None,
            **({"options": "-c synchronous_commit=off"} if lazy_commit else {}),
        },
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


T = TypeVar("T")


def run_unit_of_work(
    factory: sessionmaker[Session], work: Callable[[Session], T], *, attempts: int = 3
) -> T:
    """Run ``work`` in one unit of work, again from the start if a concurrent writer won a race.

    Two transactions that write the same new request id without sharing a row lock
    both pass the idempotency check; the second then fails on the unique key when the
    first commits. Run again, it sees the first one's record and answers its outcome.
    The same holds for a deadlock or serialization failure reported by PostgreSQL.
    """
    for attempt in range(attempts):
        try:
            with unit_of_work(factory) as session:
                return work(session)
        except _RETRYABLE as exc:
            if not _is_race(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# The write path talks to the driver directly, so its errors come unwrapped too.
_RETRYABLE = (IntegrityError, OperationalError, psycopg.Error, sqlite3.IntegrityError)


def _is_race(exc: BaseException) -> bool:
    if isinstance(exc, IntegrityError | sqlite3.IntegrityError | psycopg.errors.UniqueViolation):
        return True
    original = getattr(exc, "orig", exc)
    # serialization failure, deadlock detected
    return getattr(original, "sqlstate", None) in ("40001", "40P01")


def _configure_sqlite(engine: Engine, *, begin: str, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so that we can issue BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)
