"""The group commit's statements, sent straight through the driver of each engine.

The core computes balances in memory under row locks, so what reaches the database is a
fixed set of statements per group commit. Sending them through SQLAlchemy's per-row
parameter processing cost several times the database work itself; here they go to the
DBAPI connection of the session's own transaction: ``sqlite3`` ``executemany``, and on
PostgreSQL one pipeline for the reads and ``COPY`` (or a pipeline, for small batches)
for the writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ubc.db.driver import COPY_THRESHOLD, Driver, execute_all
from ubc.ledger.engine import AccountState

TransferRow = tuple[str, int, int, str, int, str, str, str | None, str | None, Any, str | None, Any]
PostingRow = tuple[int, str, str, int, int, int, int, Any]
RequestRow = tuple[str, bytes, str, str, Any]
HoldRow = tuple[str, int, int, str, int, str, str, datetime | None]

_ACCOUNT_COLUMNS = (
    "id, address, asset, non_negative, debits_posted, credits_posted, debits_pending, "
    "credits_pending"
)
_HOLD_COLUMNS = "id, debit_account_id, credit_account_id, asset, amount, kind, state, timeout_at"
_TRANSFER_COLUMNS = (
    "id, debit_account_id, credit_account_id, asset, amount, kind, phase, pending_id, "
    "state, timeout_at, memo, created_at"
)
_POSTING_COLUMNS = (
    "account_id, transfer_id, side, posted, pending, balance_after, available_after, created_at"
)
_REQUEST_COLUMNS = "id, payload_hash, status, result, created_at"


class LedgerDriver(Driver):
    """Statements of the ledger's group commit for the session's engine."""

    def lock_holds(self, ids: Sequence[str]) -> list[HoldRow]:
        """Pending transfers by id, locked in id order."""
        sql = (
            f"SELECT {_HOLD_COLUMNS} FROM transfers WHERE phase = 'pending' AND id IN "
            f"({self._marks(len(ids))}) ORDER BY id"
        )
        if self.postgres:
            sql += " FOR UPDATE"
        rows = self._fetch(sql, list(ids))
        read_timestamp = self._read_timestamp
        return [
            (hold_id, debit_id, credit_id, asset, amount, kind, state, read_timestamp(timeout_at))
            for hold_id, debit_id, credit_id, asset, amount, kind, state, timeout_at in rows
        ]

    def lock_accounts_and_requests(
        self,
        addresses_by_asset: dict[str, list[str]],
        account_ids: Sequence[int],
        request_ids: Sequence[str],
    ) -> tuple[list[AccountState], list[tuple[str, bytes, str, str]]]:
        """Lock the accounts in id order, then read the requests already recorded.

        The requests are read after the locks: a concurrent writer of the same id has
        committed by then, and READ COMMITTED lets the second statement see it.
        """
        account_sql, params = self.lock_accounts_statement(addresses_by_asset, account_ids)
        if self.postgres:
            request_sql = "SELECT id, payload_hash, status, result FROM requests WHERE id = ANY(%s)"
            with self.raw.pipeline():
                # Never prepared: a generic plan chosen while the tables were small (a
                # sequential scan) would stay as they grow.
                accounts_cursor = self.raw.execute(account_sql, params, prepare=False)
                requests_cursor = self.raw.execute(request_sql, [list(request_ids)], prepare=False)
            accounts = accounts_cursor.fetchall()
            requests = requests_cursor.fetchall()
        else:
            accounts = self._fetch(account_sql, params)
            requests = self._fetch(
                f"SELECT id, payload_hash, status, result FROM requests WHERE id IN "
                f"({self._marks(len(request_ids))})",
                list(request_ids),
            )
        return (
            self.account_states(accounts),
            [
                (request_id, bytes(payload_hash), status, result)
                for request_id, payload_hash, status, result in requests
            ],
        )

    def lock_accounts_statement(
        self, addresses_by_asset: Mapping[str, Sequence[str]], account_ids: Sequence[int]
    ) -> tuple[str, list[Any]]:
        """The statement that locks accounts (by asset and address, or by id) in id order."""
        terms: list[str] = []
        params: list[Any] = []
        for asset, addresses in sorted(addresses_by_asset.items()):
            if self.postgres:
                terms.append("(asset = %s AND address = ANY(%b::text[]))")
                params.extend([asset, list(addresses)])
            else:
                terms.append(f"(asset = ? AND address IN ({self._marks(len(addresses))}))")
                params.append(asset)
                params.extend(addresses)
        if account_ids:
            if self.postgres:
                terms.append("id = ANY(%b::bigint[])")
                params.append(list(account_ids))
            else:
                terms.append(f"id IN ({self._marks(len(account_ids))})")
                params.extend(account_ids)
        sql = (
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE {' OR '.join(terms) or 'FALSE'} "
            "ORDER BY id"
        )
        if self.postgres:
            sql += " FOR UPDATE"
        return sql, params

    @staticmethod
    def account_states(rows: Sequence[Sequence[Any]]) -> list[AccountState]:
        """The posting engine's accounts from rows of :meth:`lock_accounts_statement`."""
        # The DBAPI's tuples unpacked by name, in the order of the columns selected.
        return [
            AccountState(
                account_id,
                address,
                asset,
                bool(non_negative),
                debits_posted,
                credits_posted,
                debits_pending,
                credits_pending,
            )
            for (
                account_id,
                address,
                asset,
                non_negative,
                debits_posted,
                credits_posted,
                debits_pending,
                credits_pending,
            ) in rows
        ]

    def write(
        self,
        transfers: Sequence[TransferRow],
        postings: Sequence[PostingRow],
        accounts: Sequence[tuple[int, int, int, int, int]],
        holds: Sequence[tuple[str, str]],
        requests: Sequence[RequestRow],
        pending: list[tuple[str, Sequence[Any]]] | None = None,
    ) -> None:
        """Insert transfers, postings and requests; set balances and hold states.

        With ``pending`` (PostgreSQL), the statements that need no round trip of their own
        are added to it instead, for the caller to send with its own later in the same
        transaction (``COPY`` of a large batch is sent at once)."""
        if not self.postgres:
            update_accounts = (
                "UPDATE accounts SET debits_posted = ?, credits_posted = ?, "
                "debits_pending = ?, credits_pending = ? WHERE id = ?"
            )
            cursor = self.raw.cursor()
            try:
                execute_all(
                    cursor,
                    [
                        (self._insert("transfers", _TRANSFER_COLUMNS, 12), transfers),
                        (self._insert("postings", _POSTING_COLUMNS, 8), postings),
                        (update_accounts, accounts),
                        ("UPDATE transfers SET state = ? WHERE id = ?", holds),
                        (self._insert("requests", _REQUEST_COLUMNS, 5), requests),
                    ],
                )
            finally:
                cursor.close()
            return
        # One statement per table: rows as arrays (``unnest``) in one pipeline, or ``COPY``
        # (a round trip per table, but the cheapest for the server) for large batches.
        statements: list[tuple[str, Sequence[Any]]] = []
        with self.raw.cursor() as cursor:
            for name, columns, rows in (
                ("transfers", _TRANSFER_COLUMNS, transfers),
                ("postings", _POSTING_COLUMNS, postings),
                ("requests", _REQUEST_COLUMNS, requests),
            ):
                if len(rows) >= COPY_THRESHOLD:
                    self._copy(cursor, name, columns, rows)
                elif rows:
                    statements.append(self.insert_statement(name, columns, rows))
        if accounts:
            statements.append(
                (
                    "UPDATE accounts SET debits_posted = u.dp, credits_posted = u.cp, "
                    "debits_pending = u.dpe, credits_pending = u.cpe FROM "
                    "unnest(%b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], "
                    "%b::bigint[]) AS u(dp, cp, dpe, cpe, id) WHERE accounts.id = u.id",
                    [list(column) for column in zip(*accounts, strict=True)],
                )
            )
        if holds:
            statements.append(
                (
                    "UPDATE transfers SET state = u.state FROM unnest(%b::text[], %b::text[]) "
                    "AS u(state, id) WHERE transfers.id = u.id",
                    [list(column) for column in zip(*holds, strict=True)],
                )
            )
        if pending is not None:
            pending.extend(statements)
        elif statements:
            self.execute_many(statements)
