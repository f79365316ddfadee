"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production).

SQLite runs in WAL mode with ``synchronous=FULL`` so a committed transfer survives
power loss, and every write transaction starts with ``BEGIN IMMEDIATE`` so writers
queue on the database lock up front instead of failing on upgrade. PostgreSQL runs
at READ COMMITTED; the ledger takes row locks in one sorted order (see
``ubc.ledger.service``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, Table, TextClause, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from ubc.db import driver
from ubc.dburl import normalise_database_url
from ubc.errors import Unavailable
from ubc.files import create_private_sqlite

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A PostgreSQL server that does not answer (a host gone, a dropped route) fails a new
# connection after this long instead of the TCP timeout (minutes): a 503 the caller can retry.
POSTGRES_CONNECT_TIMEOUT_S = 10
# Seconds a client should wait before retrying after a 503 (``Retry-After``).
RETRY_AFTER_S = 5
# A "database or disk full" error keeps /readyz failing this long, so that a load balancer
# takes the instance out while writes cannot succeed (and lets it back in after).
FULL_MEMORY_S = 30.0
# /readyz on SQLite fails when the database's file system has less free space than this.
SQLITE_MIN_FREE_BYTES = 1024 * 1024


def table(model: type[Any]) -> Table:
    """The Core table of a SQLModel table class, typed (for statements that read or write
    columns by name without the ORM's per-row cost)."""
    result = model.__table__
    assert isinstance(result, Table)
    return result


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def on_postgresql(session: Session) -> bool:
    """Whether ``session`` talks to PostgreSQL (row locks, ``COLLATE "C"``, ``COPY``);
    otherwise SQLite, whose one writer at a time needs none of them."""
    return session.get_bind().dialect.name == "postgresql"


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    readonly: bool = False,
    durable: bool = True,
    lazy_commit: bool = False,
    connect_timeout: int = POSTGRES_CONNECT_TIMEOUT_S,
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

    ``connect_timeout`` (PostgreSQL, seconds): a new connection fails after this long.
    """
    url = normalise_database_url(url)
    if is_sqlite(url):
        create_private_sqlite(url)  # 0600: a ledger is nobody else's to read
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
        _remember_full_errors(engine)
        return engine
    engine = create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No ping per checkout (a round trip per transaction): a connection found dead
        # invalidates the whole pool, and ``run_unit_of_work`` and read sessions (see
        # ``make_session_factory``) run their transaction or statement once more.
        pool_pre_ping=False,
        pool_recycle=1800,
        isolation_level="READ COMMITTED",
        # psycopg prepares a statement after 5 runs, and PostgreSQL may then keep a
        # generic plan chosen while tables were small (a sequential scan) as they grow.
        connect_args={
            "prepare_threshold": None,
            "connect_timeout": connect_timeout,
            **({"options": "-c synchronous_commit=off"} if lazy_commit else {}),
        },
    )
    _remember_full_errors(engine)
    return engine


def make_session_factory(engine: Engine, *, retry_reads: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; with ``retry_reads`` (sessions that only read), a query
    (SELECT) that fails because its connection was found dead runs once more on a new
    connection.

    That is safe for reads: on PostgreSQL (READ COMMITTED) every statement sees its own
    snapshot anyway, so a statement run again on a new connection sees no less consistent
    a state than it would have; SQLite has no connection to lose.
    """
    factory = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    if retry_reads:
        event.listen(factory, "do_orm_execute", _retry_read_once)
    return factory


def _retry_read_once(state: ORMExecuteState) -> Any:
    try:
        return state.invoke_statement()
    except DBAPIError as exc:
        if not (is_disconnect(exc) and _is_query(state)):
            raise
    # The dead connection was invalidated (with the rest of the pool); a new transaction
    # takes a new connection.
    state.session.rollback()
    return state.invoke_statement()


def _is_query(state: ORMExecuteState) -> bool:
    if state.is_select:
        return True
    statement = state.statement
    return isinstance(statement, TextClause) and statement.text.lstrip()[:6].upper() == "SELECT"


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        _rollback_quietly(session)
        raise
    finally:
        session.close()


def _rollback_quietly(session: Session) -> None:
    # On a dead connection the rollback fails too (and invalidates the connection): the
    # error worth raising is the one that made us roll back.
    with contextlib.suppress(DBAPIError, psycopg.Error, sqlite3.Error):
        session.rollback()


T = TypeVar("T")


def run_unit_of_work(
    factory: sessionmaker[Session],
    work: Callable[[Session], T],
    *,
    attempts: int = 3,
    idempotent: bool = False,
) -> T:
    """Run ``work`` in one unit of work, again from the start if a concurrent writer won a race.

    Two transactions that write the same new request id without sharing a row lock
    both pass the idempotency check; the second then fails on the unique key when the
    first commits. Run again, it sees the first one's record and answers its outcome.
    The same holds for a deadlock or serialization failure reported by PostgreSQL.

    A connection lost before the commit (PostgreSQL restarted, failed over, or the
    backend terminated) is also run again, once, on a new connection: that transaction
    never committed, so running it again is running it for the first time. A connection
    lost *during* the commit leaves it unknown whether the commit happened; such work is
    run again only when ``idempotent`` says that a second run of committed work changes
    nothing (it then finds its own records and answers from them).
    """
    reconnected = False
    race = 0
    while True:
        session = factory()
        committing = False
        try:
            result = work(session)
            committing = True
            # With the statements the work left for the commit (one round trip).
            driver.commit(session)
            return result
        except _RETRYABLE as exc:
            _rollback_quietly(session)
            if is_disconnect(exc):
                if reconnected or (committing and not idempotent):
                    raise
                reconnected = True
                continue
            race += 1
            if not _is_race(exc) or race >= attempts:
                raise
        except BaseException:
            _rollback_quietly(session)
            raise
        finally:
            session.close()


# The write path talks to the driver directly, so its errors come unwrapped too.
_RETRYABLE = (DBAPIError, psycopg.Error, sqlite3.Error)
# Every error a database call can raise (the HTTP layer answers them in the documented shape).
DATABASE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, psycopg.Error, sqlite3.Error)


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to the database was lost (a server restart, a
    failover, a terminated backend): the transaction in it did not commit, and a new
    connection may well work."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        return exc.orig is not None and is_disconnect(exc.orig)
    if isinstance(exc, psycopg.InterfaceError):  # "the connection is closed"
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        # None: lost without a message from the server (it closed the socket or died).
        return state is None or state.startswith("08") or state in _DISCONNECT_STATES
    return False


# admin_shutdown, crash_shutdown, cannot_connect_now
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03"})
# Classes 53 (insufficient resources: disk_full, out_of_memory, too_many_connections),
# 08 (connection exception) and 57P (shutdown, cannot connect now, database dropped).
_UNAVAILABLE_STATES_PREFIX = ("53", "08", "57P")
_SQLITE_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


def _driver_error(exc: BaseException) -> BaseException:
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the database's disk (or size limit) being full."""
    orig = _driver_error(exc)
    if isinstance(orig, sqlite3.Error):
        return (getattr(orig, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return isinstance(orig, psycopg.errors.DiskFull)


def as_unavailable(exc: BaseException) -> Unavailable | None:
    """The 503 that ``exc`` means, if it is the database being unreachable, restarting,
    full, out of resources or locked past the busy timeout (a condition that passes, not a
    bug); None for any other error."""
    if isinstance(exc, PoolTimeout):
        return Unavailable(
            "the database is busy: no connection was free in time", retry_after=RETRY_AFTER_S
        )
    orig = _driver_error(exc)
    if is_full(exc):
        return Unavailable(
            "the database is full: nothing can be written until space is freed",
            detail={"reason": "database_full"},
            retry_after=RETRY_AFTER_S * 6,
        )
    unavailable = is_disconnect(exc)
    if isinstance(orig, psycopg.Error) and orig.sqlstate is not None:
        unavailable = unavailable or orig.sqlstate.startswith(_UNAVAILABLE_STATES_PREFIX)
    elif isinstance(orig, sqlite3.OperationalError | sqlite3.DatabaseError):
        code = getattr(orig, "sqlite_errorcode", 0) & 0xFF
        unavailable = unavailable or code in _SQLITE_UNAVAILABLE
    if not unavailable:
        return None
    return Unavailable(
        "the database is unavailable; try again shortly",
        detail={"reason": "database_unavailable"},
        retry_after=RETRY_AFTER_S,
    )


# --- "database full" seen lately, by database: /readyz reports it ---------------------------

_full_since: dict[str, float] = {}


def _database_key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _remember_full_errors(engine: Engine) -> None:
    key = _database_key(engine)

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        if is_full(context.original_exception):
            _full_since[key] = time.monotonic()


def recently_full(engine: Engine) -> bool:
    """Whether a write to ``engine``'s database failed for lack of space in the last
    :data:`FULL_MEMORY_S` seconds."""
    since = _full_since.get(_database_key(engine))
    return since is not None and time.monotonic() - since < FULL_MEMORY_S


def readiness_problem(engine: Engine) -> str | None:
    """Why ``engine``'s database cannot take writes now, or None: unreachable, full or
    locked. Cheap enough for a readiness probe: one connection, one rolled-back write of a
    page and (SQLite) a look at the free space of the database's file system.

    The probe writes one page: it fails on a full disk (PostgreSQL extends the file of a
    temporary table at once), or at SQLite's page limit (``max_page_count``); SQLite
    writes pages only at commit, so there the free space is looked at too. A write that
    failed for lack of space in the last :data:`FULL_MEMORY_S` seconds also counts (a
    large write may not fit where the probe's page did).
    """
    for attempt in (1, 2):
        try:
            _probe_write(engine)
            break
        except Exception as exc:  # any driver error means not ready
            if is_full(exc):
                return "database full"
            if attempt == 1 and is_disconnect(exc):
                continue  # a connection of the pool was dead (a restart): the pool is renewed
            return f"database unreachable: {type(exc).__name__}: {_first_line(exc)}"
    if recently_full(engine):
        return "database full: a write failed for lack of space lately"
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        folder = Path(database).parent
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder if str(folder) else os.curdir).free
            if free < SQLITE_MIN_FREE_BYTES:
                return f"database full: {free} bytes free on its file system"
    return None


def _probe_write(engine: Engine) -> None:
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Allocates a page (the table's root): SQLITE_FULL at the database's size limit.
            connection.execute(text("CREATE TABLE _ubc_ready_probe (x INTEGER)"))
        else:
            connection.execute(text("CREATE TEMPORARY TABLE _ubc_ready_probe (x integer)"))
            connection.execute(text("INSERT INTO _ubc_ready_probe VALUES (1)"))
        connection.rollback()  # leaves nothing behind


def _first_line(exc: BaseException) -> str:
    lines = str(_driver_error(exc)).strip().splitlines()
    return lines[0] if lines else ""


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
