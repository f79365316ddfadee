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

from ubc.db import on_postgresql
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


@dataclass(frozen=True, slots=True)
class AddressRange:
    """The member accounts of ``asset`` with ``after < address <= through`` in code-point
    order, and the cap above which a close expires."""

    asset: str
    after: str
    through: str
    cap: int

    def params(self) -> dict[str, str | int]:
        return {"asset": self.asset, "after": self.after, "through": self.through, "cap": self.cap}


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
    if not on_postgresql(session):
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


def lock_range(session: Session, span: AddressRange, source: int) -> None:
    """Lock the member accounts of the range whose posted balance is above its cap (those
    a close step may debit or must record a hold of), and ``source``, in ascending id
    order (PostgreSQL only)."""
    if not on_postgresql(session):
        return
    session.execute(
        text(
            "SELECT count(*) FROM (SELECT id FROM accounts WHERE id = :source "
            f"OR ({_in_range(session)} AND credits_posted - debits_posted > :cap) "
            "ORDER BY id FOR UPDATE) locked"
        ),
        {**span.params(), "source": source},
    )


def range_above_cap_legs(session: Session, span: AddressRange, epoch: int, first_leg: int) -> int:
    """Add to ``epoch_expiries`` one leg per member account of the range that can spend
    more than the cap, for what it can spend above it, numbered by address from
    ``first_leg``; how many."""
    result = session.execute(
        text(
            "INSERT INTO epoch_expiries (epoch, leg, account_id, amount) "
            f"SELECT :n, :first + ROW_NUMBER() OVER (ORDER BY address{binary_order(session)}) "
            f"- 1, id, {AVAILABLE} - :cap FROM accounts "
            f"WHERE {_in_range(session)} AND {AVAILABLE} > :cap"
        ),
        {**span.params(), "n": epoch, "first": first_leg},
    )
    return int(getattr(result, "rowcount", 0))


def held_by_calls(session: Session, span: AddressRange) -> dict[str, int]:
    """What model calls hold (pending ``hold:`` transfers, which the journal does not
    record) on the member accounts of the range whose expiry they limit: those that could
    spend more than the cap without them. Address → amount held."""
    return {
        str(r.address): int(r.held)
        for r in session.execute(
            text(
                "SELECT a.address, h.held FROM accounts a JOIN "
                "(SELECT debit_account_id, sum(amount) AS held FROM transfers "
                "WHERE state = 'pending' AND id LIKE 'hold:%' GROUP BY debit_account_id) h "
                f"ON h.debit_account_id = a.id WHERE {_in_range(session, 'a.')} "
                "AND a.credits_posted - a.debits_posted - a.debits_pending + h.held > :cap"
            ),
            span.params(),
        )
    }


def member_account_after(session: Session, asset: str, address: str) -> bool:
    """Whether a member account of ``asset`` comes after ``address`` in code-point order."""
    order = binary_order(session)
    return (
        session.execute(
            text(
                "SELECT 1 FROM accounts WHERE asset = :asset AND address LIKE 'member:%' "
                f"AND address{order} > :address{order} LIMIT 1"
            ),
            {"asset": asset, "address": address},
        ).first()
        is not None
    )


def next_range_end(session: Session, asset: str, after: str, size: int) -> str | None:
    """The address that ends a range of ``size`` member accounts of ``asset`` after
    ``after`` (fewer if fewer are left); None if none is left."""
    order = binary_order(session)
    params = {"asset": asset, "after": after, "skip": size - 1}
    member = f"asset = :asset AND address LIKE 'member:%' AND address{order} > :after{order}"
    end = session.execute(
        text(
            f"SELECT address FROM accounts WHERE {member} ORDER BY address{order} "
            "LIMIT 1 OFFSET :skip"
        ),
        params,
    ).scalar_one_or_none()
    if end is None:
        end = session.execute(
            text(f"SELECT max(address{order}) FROM accounts WHERE {member}"), params
        ).scalar_one_or_none()
    return None if end is None else str(end)


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
    first_leg: int = 0,
) -> tuple[int, int]:
    """Transfers, postings and balances for the window's legs, between each leg's member
    account and ``source`` (issuance debits, expiry credits); (count, total). The
    transfers are ``<envelope id>:<leg - first_leg>``."""
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
        "first_leg": first_leg,
    }
    member, other = ("credit_account_id", "debit_account_id")
    if not source_is_debit:
        member, other = other, member
    legs = f"FROM {table} e WHERE e.epoch = :n AND e.leg >= :lo AND e.leg < :hi"
    transfer_id = ":envelope || CAST(e.leg - :first_leg AS VARCHAR(20))"
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
    return ' COLLATE "C"' if on_postgresql(session) else ""


def _in_range(session: Session, prefix: str = "") -> str:
    order = binary_order(session)
    address = f"{prefix}address{order}"
    return (
        f"{prefix}asset = :asset AND {prefix}address LIKE 'member:%' "
        f"AND {address} > :after{order} AND {address} <= :through{order}"
    )


def _legs_table(window: LegWindow) -> str:
    if window.table not in LEG_TABLES:
        raise ValueError(f"not a legs table: {window.table}")
    return window.table


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
