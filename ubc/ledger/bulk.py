"""Bulk moves of the posting engine: one leg per member, written by set-based SQL.

An allocation epoch credits a million members from ``system:issuance`` and its close
debits what they hold above a cap into ``system:expired``. Per-leg processing would cost
minutes; here every leg of a window is one row of a legs table (``epoch_allocations``,
``epoch_expiries``: ``epoch, leg, account_id, amount``, filled by the epochs domain), and
a window of legs becomes transfers, postings (with their running ``balance_after``) and
balances in a handful of ``INSERT ... SELECT`` and ``UPDATE ... FROM`` statements. The
invariants are the engine's: a member is only credited, or debited at most what it can
spend, so no non-negative account goes below zero; the system account's postings run in
leg order.

Transfers are named ``<envelope id>:<leg>``, so the auditor derives the same ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from ubc.db.driver import Driver
from ubc.errors import NotFound

LEG_TABLES = frozenset({"epoch_allocations", "epoch_expiries"})
# What a member account may still spend, in SQL.
AVAILABLE = "credits_posted - debits_posted - debits_pending"


@dataclass(frozen=True, slots=True)
class LegWindow:
    """Legs ``lo <= leg < hi`` of ``epoch`` in the legs table ``table``."""

    table: str
    epoch: int
    lo: int
    hi: int

    def params(self) -> dict[str, int]:
        return {"n": self.epoch, "lo": self.lo, "hi": self.hi}


def account_id(session: Session, address: str, asset: str) -> int:
    value = session.execute(
        text("SELECT id FROM accounts WHERE address = :address AND asset = :asset"),
        {"address": address, "asset": asset},
    ).scalar_one_or_none()
    if value is None:
        raise NotFound(f"no account {address} for asset {asset}")
    return int(value)


def lock_window(session: Session, window: LegWindow, source: int) -> None:
    """Lock the window's member accounts and ``source`` in ascending id order, like every
    other writer (no deadlocks). PostgreSQL only: SQLite serialises writers."""
    if not _postgres(session):
        return
    table = _legs_table(window)
    session.execute(
        text(
            # One index lookup per leg (an OR would walk the whole primary key), and the
            # locked ids counted on the server instead of sent to the client.
            "SELECT count(*) FROM (SELECT id FROM accounts WHERE id IN "
            f"(SELECT account_id FROM {table} WHERE epoch = :n AND leg >= :lo "
            "AND leg < :hi UNION ALL SELECT :source) ORDER BY id FOR UPDATE) locked"
        ),
        {**window.params(), "source": source},
    )


def lock_above(session: Session, asset: str, cap: int, source: int) -> None:
    """Lock the member accounts of ``asset`` that can spend more than ``cap``, and
    ``source``, in ascending id order (PostgreSQL only)."""
    if not _postgres(session):
        return
    session.execute(
        text(
            "SELECT count(*) FROM (SELECT id FROM accounts WHERE id = :source "
            f"OR ({_above()}) ORDER BY id FOR UPDATE) locked"
        ),
        {"asset": asset, "cap": cap, "source": source},
    )


def above_cap_legs(session: Session, epoch: int, asset: str, cap: int) -> int:
    """Fill ``epoch_expiries`` with one leg per member account of ``asset`` that can spend
    more than ``cap`` (numbered by address), for what it can spend above it; how many."""
    session.execute(
        text(
            "INSERT INTO epoch_expiries (epoch, leg, account_id, amount) "
            f"SELECT :n, ROW_NUMBER() OVER (ORDER BY address{binary_order(session)}) - 1, id, "
            f"{AVAILABLE} - :cap FROM accounts WHERE {_above()}"
        ),
        {"asset": asset, "cap": cap, "n": epoch},
    )
    count = session.execute(
        text("SELECT count(*) FROM epoch_expiries WHERE epoch = :n"), {"n": epoch}
    ).scalar_one()
    return int(count)


def held_above(session: Session, asset: str, cap: int) -> dict[str, int]:
    """Member accounts of ``asset`` with a posted balance above ``cap`` and holds pending:
    address → amount held."""
    return {
        str(r.address): int(r.debits_pending)
        for r in session.execute(
            text(
                "SELECT address, debits_pending FROM accounts WHERE asset = :asset "
                "AND address LIKE 'member:%' AND debits_pending > 0 "
                "AND credits_posted - debits_posted > :cap"
            ),
            {"asset": asset, "cap": cap},
        )
    }


def member_available(session: Session, address: str, asset: str) -> int | None:
    """What the member account can spend now; None if there is no such member account."""
    row = session.execute(
        text(
            f"SELECT {AVAILABLE} AS available FROM accounts "
            "WHERE address = :address AND asset = :asset AND address LIKE 'member:%'"
        ),
        {"address": address, "asset": asset},
    ).first()
    return None if row is None else int(row.available)


@contextmanager
def pending_elsewhere(session: Session, asset: str, held: Mapping[str, int]) -> Iterator[None]:
    """Count ``held`` (address → amount, holds pending outside these tables) as pending on
    their accounts for the duration of the block, then take it off again."""
    _shift_pending(session, asset, held, +1)
    yield
    _shift_pending(session, asset, held, -1)


def move(
    session: Session,
    window: LegWindow,
    envelope_id: str,
    asset: str,
    *,
    source: int,
    kind: str,
    source_is_debit: bool,
    now: datetime,
) -> tuple[int, int]:
    """Transfers, postings and balances for the window's legs, between each leg's member
    account and ``source`` (issuance debits, expiry credits); (count, total)."""
    table = _legs_table(window)
    params_window = window.params()
    count, total = session.execute(
        text(
            f"SELECT count(*), coalesce(sum(amount), 0) FROM {table} "
            "WHERE epoch = :n AND leg >= :lo AND leg < :hi"
        ),
        params_window,
    ).one()
    count, total = int(count), int(total)
    if count == 0:
        return 0, 0
    stamp = Driver(session).timestamp(now)
    source_row = session.execute(
        text(
            "SELECT credits_posted - debits_posted AS balance, "
            f"{AVAILABLE} AS available FROM accounts WHERE id = :id"
        ),
        {"id": source},
    ).one()
    balance, available = int(source_row.balance), int(source_row.available)
    params = {
        **params_window,
        "envelope": envelope_id + ":",
        "asset": asset,
        "source": source,
        "now": stamp,
        "kind": kind,
        "balance": balance,
        "available": available,
    }
    member, other = ("credit_account_id", "debit_account_id")
    if not source_is_debit:
        member, other = other, member
    legs = f"FROM {table} e WHERE e.epoch = :n AND e.leg >= :lo AND e.leg < :hi"
    transfer_id = ":envelope || CAST(e.leg AS VARCHAR(20))"
    session.execute(
        text(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, asset, amount, "
            "kind, phase, pending_id, state, timeout_at, memo, created_at) "
            f"SELECT {transfer_id}, "
            f"{':source' if other == 'debit_account_id' else 'e.account_id'}, "
            f"{':source' if other == 'credit_account_id' else 'e.account_id'}, "
            f":asset, e.amount, :kind, 'posted', NULL, NULL, NULL, NULL, :now {legs}"
        ),
        params,
    )
    # The member side, computed from balances before this batch's update.
    member_side, sign = ("C", "+") if source_is_debit else ("D", "-")
    session.execute(
        text(
            "INSERT INTO postings (account_id, transfer_id, side, posted, pending, "
            "balance_after, available_after, created_at) "
            f"SELECT e.account_id, {transfer_id}, '{member_side}', e.amount, 0, "
            f"a.credits_posted - a.debits_posted {sign} e.amount, "
            f"a.credits_posted - a.debits_posted - a.debits_pending {sign} e.amount, :now "
            f"FROM {table} e JOIN accounts a ON a.id = e.account_id "
            "WHERE e.epoch = :n AND e.leg >= :lo AND e.leg < :hi"
        ),
        params,
    )
    # The source side: one posting per leg, its balance running in leg order.
    source_side, run = ("D", "-") if source_is_debit else ("C", "+")
    session.execute(
        text(
            "INSERT INTO postings (account_id, transfer_id, side, posted, pending, "
            "balance_after, available_after, created_at) "
            f"SELECT :source, {transfer_id}, '{source_side}', e.amount, 0, "
            f":balance {run} SUM(e.amount) OVER (ORDER BY e.leg), "
            f":available {run} SUM(e.amount) OVER (ORDER BY e.leg), :now {legs}"
        ),
        params,
    )
    column = "credits_posted" if source_is_debit else "debits_posted"
    session.execute(
        text(
            f"UPDATE accounts SET {column} = accounts.{column} + e.amount "
            f"FROM {table} e WHERE accounts.id = e.account_id AND e.epoch = :n "
            "AND e.leg >= :lo AND e.leg < :hi"
        ),
        params_window,
    )
    source_column = "debits_posted" if source_is_debit else "credits_posted"
    session.execute(
        text(f"UPDATE accounts SET {source_column} = {source_column} + :total WHERE id = :id"),
        {"total": total, "id": source},
    )
    return count, total


def binary_order(session: Session) -> str:
    """Order strings by code point on both engines, whatever PostgreSQL's collation: the
    auditor derives the same leg numbers from its re-run."""
    return ' COLLATE "C"' if _postgres(session) else ""


def _above() -> str:
    return f"asset = :asset AND address LIKE 'member:%' AND {AVAILABLE} > :cap"


def _legs_table(window: LegWindow) -> str:
    if window.table not in LEG_TABLES:
        raise ValueError(f"not a legs table: {window.table}")
    return window.table


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _shift_pending(session: Session, asset: str, held: Mapping[str, int], sign: int) -> None:
    if not held:
        return
    session.execute(
        text(
            "UPDATE accounts SET debits_pending = debits_pending + :amount "
            "WHERE address = :address AND asset = :asset"
        ),
        [
            {"amount": sign * amount, "address": address, "asset": asset}
            for address, amount in held.items()
        ],
    )
