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


def execute_all(cursor: Any, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
    for sql, rows in statements:
        if rows:
            cursor.executemany(sql, rows)
