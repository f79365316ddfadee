"""Statements sent straight through each engine's DBAPI driver, bypassing SQLAlchemy's
per-row parameter processing where it costs more than the database work itself.

The connection is the session's own (same transaction): ``sqlite3`` ``executemany``; on
PostgreSQL ``COPY`` for large batches and pipelines for small ones. The ledger's group
commit builds its statements on this (``ubc.ledger._sql``); the journal and the gateway
insert their rows with :meth:`Driver.insert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

# Below this many rows a pipelined executemany beats COPY's extra round trip.
COPY_THRESHOLD = 64


class Driver:
    """Raw statements on the session's connection, for its engine."""

    def __init__(self, session: Session) -> None:
        connection = session.connection()
        self.postgres = connection.dialect.name == "postgresql"
        self.raw: Any = connection.connection.driver_connection
        self.mark = "%s" if self.postgres else "?"

    def timestamp(self, moment: datetime) -> Any:
        """``moment`` as the engine stores a UTC timestamp column."""
        if self.postgres:
            return moment
        return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")

    def insert(self, table: str, columns: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` into ``table``: ``COPY`` for large batches on PostgreSQL."""
        if not rows:
            return
        if self.postgres and len(rows) >= COPY_THRESHOLD:
            with self.raw.cursor() as cursor:
                self._copy(cursor, table, columns, rows)
            return
        count = columns.count(",") + 1
        cursor = self.raw.cursor()
        try:
            cursor.executemany(self._insert(table, columns, count), rows)
        finally:
            cursor.close()

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """``column`` is one of ``values``: a condition and its parameters (one array
        parameter on PostgreSQL, so that the statement's text does not vary with the count)."""
        if self.postgres:
            return f"{column} = ANY(%b::text[])", [list(values)]
        if not values:
            return "0 = 1", []
        return f"{column} IN ({self._marks(len(values))})", list(values)

    def fetch_many(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """The rows of each statement, in order: on PostgreSQL all of them in one round
        trip (a pipeline; each statement still runs after the one before it, so one that
        waits for a lock holds back those behind it, which then see what was committed
        before the lock was granted)."""
        if not self.postgres:
            return [self._fetch(sql, list(params)) for sql, params in statements]
        with self.raw.pipeline():
            cursors = [
                # Never prepared: see ``ubc.db.make_engine``.
                self.raw.execute(sql, list(params), prepare=False)
                for sql, params in statements
            ]
        try:
            return [list(cursor.fetchall()) for cursor in cursors]
        finally:
            for cursor in cursors:
                cursor.close()

    def insert_statement(
        self, table: str, columns: str, rows: Sequence[tuple[Any, ...]]
    ) -> tuple[str, Sequence[Any]]:
        """One statement inserting every row of ``rows`` on PostgreSQL (``unnest`` over one
        array per column, typed like the table's columns: a single parse, plan and execution
        for the whole batch instead of one per row). The arrays are sent in binary: psycopg
        dumps an array of entries' bytes about fifteen times faster than as text."""
        assert self.postgres
        names = [c.strip() for c in columns.split(",")]
        sql = (
            f"INSERT INTO {table} ({columns}) SELECT * FROM unnest("
            + ", ".join(
                f"%b::{_ARRAY_TYPES[table].get(name.strip(chr(34)), 'text')}[]" for name in names
            )
            + ")"
        )
        return sql, [list(column) for column in zip(*rows, strict=True)]

    def execute_many(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run single statements (``sql``, parameters) on PostgreSQL in one pipeline."""
        assert self.postgres
        with self.raw.cursor() as cursor, self.raw.pipeline():
            for sql, params in statements:
                cursor.execute(sql, params, prepare=False)

    # -- helpers --

    def _marks(self, count: int) -> str:
        return ", ".join([self.mark] * count)

    def _insert(self, table: str, columns: str, count: int) -> str:
        return f"INSERT INTO {table} ({columns}) VALUES ({self._marks(count)})"

    def _fetch(self, sql: str, params: list[Any]) -> list[Any]:
        cursor = (
            self.raw.execute(sql, params, prepare=False)
            if self.postgres
            else self.raw.execute(sql, params)
        )
        try:
            return list(cursor.fetchall())
        finally:
            cursor.close()

    @staticmethod
    def _copy(cursor: Any, table: str, columns: str, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def _read_timestamp(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        assert isinstance(value, datetime)
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# The element types of the columns that ``insert_statement`` fills from arrays, by table
# (any column not named here is text; PostgreSQL assigns text to varchar columns).
_ARRAY_TYPES: dict[str, dict[str, str]] = {
    "transfers": {
        "debit_account_id": "bigint",
        "credit_account_id": "bigint",
        "amount": "bigint",
        "timeout_at": "timestamptz",
        "created_at": "timestamptz",
    },
    "postings": {
        "account_id": "bigint",
        "posted": "bigint",
        "pending": "bigint",
        "balance_after": "bigint",
        "available_after": "bigint",
        "created_at": "timestamptz",
    },
    "requests": {"payload_hash": "bytea", "created_at": "timestamptz"},
    "journal_entries": {"seq": "bigint", "entry": "bytea", "committed_at": "timestamptz"},
    "merkle_nodes": {"level": "integer", "index": "bigint", "hash": "bytea"},
}


# Statements a session's work left for its commit (PostgreSQL): see ``defer``.
_DEFERRED = "ubc.deferred_statements"


def defer(session: Session, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Leave ``statements`` (PostgreSQL) to be sent with this session's COMMIT, in one round
    trip (``ubc.db.run_unit_of_work`` sends them). For writes that nothing in the unit of
    work reads again."""
    session.info.setdefault(_DEFERRED, []).extend(statements)


def commit(session: Session) -> None:
    """Commit the session: the statements left by :func:`defer` and the COMMIT go in one
    pipeline, then the session ends its transaction (psycopg finds it already committed)."""
    statements = session.info.pop(_DEFERRED, None)
    if statements:
        Driver(session).execute_many([*statements, ("COMMIT", [])])
    session.commit()


def execute_all(cursor: Any, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
    for sql, rows in statements:
        if rows:
            cursor.executemany(sql, rows)
