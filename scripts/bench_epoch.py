"""Time to open and to close an allocation epoch for 1,000,000 members, against the raw ceiling.

For each engine (PostgreSQL: 100,000 and 1,000,000 members; SQLite: 10,000 and 100,000) and
each size, a fresh subprocess (so that its peak RSS is that size's own) builds a fresh
database and measures:

- **setup** (untimed): a data dir (``ubc init``), the schema, genesis through
  ``ubc.runtime.load_runtime`` (open enrollment, a created_at window of ten years), then
  the members written straight into ``members`` and ``accounts`` by set-based SQL
  (``generate_series`` on PostgreSQL, a recursive CTE on SQLite): all active, 70% in tier
  ``standard`` (250 CU a epoch) and 30% in ``basic`` (100 CU), each with a ``member:``
  account in CU and in USD. Handles are a scattered permutation of the registration
  order (``u`` + ``i * 1000003 mod (2^31 - 1)``), so the order of legs (by handle) is not
  the physical order of the accounts, as on a real ledger. Then ``VACUUM ANALYZE`` on
  PostgreSQL (what autovacuum would have done), nothing on SQLite (ubc never analyzes).
- **open (service)**: an operator-signed ``epoch.open`` envelope through
  ``ubc.envelopes.service.submit`` in ``ubc.db.run_unit_of_work`` (it counts the members
  per tier; with at most ``ubc.epochs.service.CHUNK`` members it also fixes and applies
  their allocations), then, for a bigger epoch, exactly as the server's background task
  (``ubc.app._advance_once``) does: one ``fix_allocations`` step (the next ``CHUNK``
  handles, into ``epoch_allocations``) and one ``apply_allocations`` batch per unit of
  work, until the epoch is ``open``: the time is the envelope plus every step and batch.
- **close (service)**: an ``epoch.close`` envelope (the close and its first step: the
  first ``ubc.epochs.service.STEP`` member accounts by address), then every
  ``epoch.expire`` step the server's task journals, each its own transaction; with a
  carryover cap of 100 CU, which expires 150 CU from every ``standard`` member (70%) and
  nothing from a ``basic`` one.
- **locks**: how long each of those transactions held its lock: the open's and the
  close's entries and every close step hold the journal's lock (every other write waits),
  a fix step the epoch's row, an allocation batch its members' accounts.
- **open (raw) / close (raw)**: the ceiling of the same database on this machine: the same
  rows (one transfer per member, a posting on each side of it with the running balances,
  the member balances and the issuance or expiry account's) written by plain set-based
  SQL without the service and without row locks, in one transaction: the legs (the same
  members, amounts and leg numbers) computed once into a temporary table (not logged,
  dropped at commit), then one ``INSERT ... SELECT`` into ``transfers``, one into
  ``postings`` and one ``UPDATE ... FROM`` of ``accounts``. It runs after the service
  run on the same population, reset in between (balances zeroed, ``transfers``,
  ``postings`` and the epoch tables emptied, then ``CLUSTER accounts USING
  accounts_pkey`` and ``VACUUM ANALYZE`` on PostgreSQL, ``VACUUM`` on SQLite: the
  accounts back in id order, as populated), so both start from the same state.
  A checkpoint (``CHECKPOINT``; ``wal_checkpoint(TRUNCATE)``) precedes every timed phase.
- **checks** (untimed) after every phase: each member's CU balance is its tier's
  allocation and the issuance account's is minus the total (after open), or the cap for
  every member and the expired account holds 150 per ``standard`` member (after close);
  the counts of transfers and postings; the last running balance of the system account;
  CU balances summing to zero; the ``epochs`` row for the service.
- **memory**: the child's peak RSS (``ru_maxrss``) right after the service's open, and
  after its close (population and raw run are set-based SQL, so nothing else holds rows
  in Python), next to its RSS after setup; PostgreSQL is a separate process, so the peak RSS
  (``VmHWM``) of the server backends that served the service is reported apart; it
  includes the pages of ``shared_buffers`` the backend touched.
- **where the time goes**: the service's time per SQL statement (SQLAlchemy cursor
  events); what is left is commits, the journal append and Python.

``--runs`` repeats the service and raw runs on the same database (reset in between) and
reports medians. Every child uses a fresh database: an SQLite file in a temporary
directory or a new PostgreSQL database, dropped at the end.

    python scripts/bench_epoch.py --engines postgresql,sqlite
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from ubc.config import Settings
from ubc.db import make_engine, make_session_factory, run_unit_of_work, unit_of_work
from ubc.dbtypes import utcnow
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import Accepted, sign_payload, submit
from ubc.epochs import service as epochs
from ubc.migrations import upgrade
from ubc.runtime import load_runtime
from ubc.signing import load_signing_key

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_MEMBERS = {"postgresql": "100000,1000000", "sqlite": "10000,100000"}
ENGINES = ("sqlite", "postgresql")
ORIGIN = "bench.ubc/epoch"
ASSET = "CU"
TIERS = {"basic": 100, "standard": 250}  # basic: members with i % 10 >= 7 (30%)
CAP = 100  # expires 150 from every standard member, nothing from a basic one
SKEW_SECONDS = 10 * 365 * 86400
OPEN_TARGET_SECONDS = 60.0  # for 1,000,000 members on PostgreSQL
RATIO_TARGET = 2.0  # service within 2x the raw ceiling
FLAT = 1.05  # "flat": peak RSS at the largest size at most this times the smallest's
MIB = 1024 * 1024
# Members a benchmark registers through the write path besides the population (with keys,
# to sign transfers while an epoch opens or closes): left out of the balance checks.
PROBE_PREFIX = "probe"

# A handle per registration number i: a permutation of 0 .. 2^31 - 2 (prime modulus).
HANDLE = {
    "postgresql": "'u' || lpad(CAST((s.i * 1000003) % 2147483647 AS TEXT), 10, '0')",
    "sqlite": "printf('u%010d', (s.i * 1000003) % 2147483647)",
}
SERIES = {
    "postgresql": "WITH s(i) AS (SELECT generate_series(CAST(0 AS BIGINT), :last))",
    "sqlite": "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < :last)",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def standard_members(n: int) -> int:
    return 7 * (n // 10) + min(n % 10, 7)


# --- databases ------------------------------------------------------------------------------


@dataclass
class Database:
    engine: str
    url: str  # SQLAlchemy URL
    server_version: str
    settings: dict[str, str] = field(default_factory=dict)
    sqlite_path: Path | None = None
    pg_conninfo: str | None = None

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[Any]:
        """A plain driver connection outside any transaction (VACUUM, CHECKPOINT)."""
        if self.sqlite_path is not None:
            conn = sqlite3.connect(self.sqlite_path, isolation_level=None)
            try:
                yield conn
            finally:
                conn.close()
            return
        assert self.pg_conninfo is not None
        with psycopg.connect(self.pg_conninfo, autocommit=True) as pg:
            yield pg

    def checkpoint(self) -> None:
        with self.autocommit() as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)" if self.sqlite_path else "CHECKPOINT")

    def vacuum(self, *, full: bool) -> None:
        with self.autocommit() as conn:
            if self.sqlite_path is not None:
                if full:
                    conn.execute("VACUUM")
                return
            if full:
                # Rewritten in id order (as populated): the updates of the run before left
                # the updated rows' new versions in update order at the end of the heap.
                conn.execute("CLUSTER accounts USING accounts_pkey")
            conn.execute("VACUUM ANALYZE")

    def backend_peak_kib(self) -> int | None:
        """The largest VmHWM of the other server backends on this database (PostgreSQL)."""
        if self.pg_conninfo is None:
            return None
        with psycopg.connect(self.pg_conninfo, autocommit=True) as conn:
            pids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
            ]
        peaks = []
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]))
        return max(peaks) if peaks else None


@contextlib.contextmanager
def fresh_database(engine: str, postgres_url: str, tmp: Path) -> Iterator[Database]:
    if engine == "sqlite":
        path = tmp / "bench.db"
        yield Database(
            engine,
            f"sqlite:///{path}",
            sqlite3.sqlite_version,
            {"journal_mode": "WAL", "synchronous": "FULL"},
            sqlite_path=path,
        )
        return
    admin = make_url(postgres_url).set(drivername="postgresql")
    admin_conninfo = admin.render_as_string(hide_password=False)
    name = f"ubc_bench_epoch_{os.getpid()}"
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        conninfo = admin.set(database=name).render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            server_version = _show(conn, "server_version")
            settings = {
                s: _show(conn, s)
                for s in (
                    "shared_buffers",
                    "work_mem",
                    "maintenance_work_mem",
                    "max_wal_size",
                    "synchronous_commit",
                    "wal_compression",
                )
            }
        url = admin.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
        yield Database(engine, url, server_version, settings, pg_conninfo=conninfo)
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _show(conn: psycopg.Connection[tuple[object, ...]], setting: str) -> str:
    row = conn.execute(f"SHOW {setting}").fetchone()
    assert row is not None
    return str(row[0])


def stamp(db: Database, moment: datetime) -> Any:
    """``moment`` as the engine stores a UTC timestamp column (as ``ubc.db.driver``)."""
    if db.sqlite_path is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def ubc_command() -> list[str]:
    beside = Path(sys.executable).with_name("ubc")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ubc")
    if found:
        return [found]
    return [sys.executable, "-c", "from ubc.cli import main; main()"]


# --- population -----------------------------------------------------------------------------


def populate(db: Database, aux: Engine, members: int) -> None:
    """``members`` active members and their CU and USD accounts, by set-based SQL."""
    params = {"last": members - 1, "now": stamp(db, utcnow())}
    series, handle = SERIES[db.engine], HANDLE[db.engine]
    with aux.begin() as conn:
        conn.execute(
            text(
                f"{series} INSERT INTO members (handle, status, tier, display_name, created_at) "
                f"SELECT {handle}, 'active', CASE WHEN s.i % 10 < 7 THEN 'standard' "
                "ELSE 'basic' END, NULL, :now FROM s"
            ),
            params,
        )
        # Accounts in registration order: ids follow i, not the handle.
        conn.execute(
            text(
                f"{series} INSERT INTO accounts (address, asset, non_negative, debits_posted, "
                "credits_posted, debits_pending, credits_pending, created_at) "
                f"SELECT 'member:' || {handle}, x.asset, TRUE, 0, 0, 0, 0, :now "
                "FROM s CROSS JOIN (SELECT 'CU' AS asset UNION ALL SELECT 'USD') x "
                "ORDER BY s.i, x.asset"
            ),
            params,
        )


def reset(db: Database, aux: Engine) -> None:
    """Back to the population just written: no transfers, zero balances, no epoch."""
    with aux.begin() as conn:
        conn.execute(
            text(
                "UPDATE accounts SET debits_posted = 0, credits_posted = 0 "
                "WHERE debits_posted <> 0 OR credits_posted <> 0"
            )
        )
        if db.sqlite_path is None:
            conn.execute(
                text(
                    "TRUNCATE transfers, postings, epoch_allocations, epoch_expiries, "
                    "epoch_fixes, epoch_close_steps RESTART IDENTITY"
                )
            )
        else:
            for table in (
                "transfers",
                "postings",
                "epoch_allocations",
                "epoch_expiries",
                "epoch_fixes",
                "epoch_close_steps",
            ):
                conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text("DELETE FROM epochs"))
    db.vacuum(full=True)


# --- the service ----------------------------------------------------------------------------


class StatementClock:
    """Time per SQL statement through an engine, while ``on``."""

    def __init__(self, engine: Engine) -> None:
        self.on = False
        self.times: dict[str, list[float]] = {}
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Connection, *_: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if not self.on:
            return
        elapsed = time.perf_counter() - conn.info.pop("bench_t0")
        label = " ".join(statement.split())
        label = re.sub(r"^(INSERT INTO \w+) \([^)]*\)", r"\1", label)
        entry = self.times.setdefault(label[:110], [0, 0.0])
        entry[0] += 1
        entry[1] += elapsed


def envelope(keys: list[Any], type_: str, **fields: Any) -> dict[str, Any]:
    payload = validate_payload(
        type_,
        {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(datetime.now(UTC)),
            "actor": "operator",
            **fields,
        },
    )
    return sign_payload(payload, type_, keys).to_json()


def _accepted(outcomes: list[Any], what: str) -> None:
    if not isinstance(outcomes[0], Accepted):
        raise RuntimeError(f"{what} refused: {outcomes[0]!r}")


def _fix(session: Session) -> bool:
    """One step of fixing every opening epoch's allocations (``ubc.app._advance_once``)."""
    return any(epochs.fix_ahead(session, n) for n in epochs.pending_epochs(session))


def _advance(session: Session) -> bool:
    """One batch of every opening epoch's allocations (``ubc.app._advance_once``)."""
    now = utcnow()
    return any(
        epochs.apply_allocations(session, n, now=now) for n in epochs.pending_epochs(session)
    )


def _timed(sessions: Any, work: Any, into: list[float]) -> bool:
    """``work`` in its own unit of work; its time appended to ``into`` if it did something."""
    started = time.perf_counter()
    done = bool(run_unit_of_work(sessions, work))
    if done:
        into.append(time.perf_counter() - started)
    return done


@dataclass
class RunTimes:
    open_service: float = 0.0
    open_envelope: float = 0.0
    open_batches: int = 0
    close_service: float = 0.0
    close_envelope: float = 0.0
    open_raw: float = 0.0
    close_raw: float = 0.0
    # Each step's time: fixing (locks the epoch's row), allocating (locks its members'
    # accounts), and the close's expiry steps (each holds the journal's lock).
    fix_steps: list[float] = field(default_factory=list)
    allocation_batches: list[float] = field(default_factory=list)
    close_steps: list[float] = field(default_factory=list)


def service_open(sessions: Any, ctx: Any, keys: list[Any], number: int, times: RunTimes) -> None:
    raw = envelope(
        keys,
        "epoch.open",
        epoch=number,
        asset=ASSET,
        allocations=TIERS,
        carryover_cap=CAP,
        starts_at="2026-11-01T00:00:00Z",
        ends_at="2026-12-01T00:00:00Z",
    )
    started = time.perf_counter()
    outcomes = run_unit_of_work(sessions, lambda s: submit(s, ctx, [raw]))
    times.open_envelope = time.perf_counter() - started
    _accepted(outcomes, "epoch.open")
    while True:
        fixed = False
        while _timed(sessions, _fix, times.fix_steps):
            fixed = True
        if not (_timed(sessions, _advance, times.allocation_batches) or fixed):
            break
        times.open_batches += 1
    times.open_service = time.perf_counter() - started


def service_close(sessions: Any, ctx: Any, keys: list[Any], number: int, times: RunTimes) -> None:
    """The close's entry, then every ``epoch.expire`` step, as the server's task runs them."""
    raw = envelope(keys, "epoch.close", epoch=number)
    started = time.perf_counter()
    outcomes = run_unit_of_work(sessions, lambda s: submit(s, ctx, [raw]))
    times.close_envelope = time.perf_counter() - started
    _accepted(outcomes, "epoch.close")

    def step(session: Session) -> bool:
        return epochs.next_close_step(session, ctx, now=utcnow(), submit=submit)

    while _timed(sessions, step, times.close_steps):
        pass
    times.close_service = time.perf_counter() - started


# --- the raw ceiling ------------------------------------------------------------------------


def _tier_case(params: dict[str, Any]) -> tuple[str, str]:
    cases, names = [], []
    for i, (tier, amount) in enumerate(sorted(TIERS.items())):
        params[f"t{i}"], params[f"a{i}"] = tier, amount
        cases.append(f"WHEN :t{i} THEN :a{i}")
        names.append(f":t{i}")
    return " ".join(cases), ", ".join(names)


def _binary(db: Database) -> str:
    """Code point order on both engines, as the service numbers its legs."""
    return "" if db.sqlite_path else ' COLLATE "C"'


def _open_legs(db: Database, params: dict[str, Any], *, numbered: bool) -> str:
    case, tiers = _tier_case(params)
    leg = f"ROW_NUMBER() OVER (ORDER BY m.handle{_binary(db)}) - 1 AS leg, " if numbered else ""
    return (
        f"SELECT {leg}a.id AS account_id, a.credits_posted - a.debits_posted AS balance, "
        "a.credits_posted - a.debits_posted - a.debits_pending AS available, "
        f"CASE m.tier {case} END AS amount FROM members m JOIN accounts a "
        "ON a.address = 'member:' || m.handle AND a.asset = :asset "
        f"WHERE m.status = 'active' AND m.tier IN ({tiers})"
    )


def _close_legs(db: Database, params: dict[str, Any], *, numbered: bool) -> str:
    params["cap"] = CAP
    available = "a.credits_posted - a.debits_posted - a.debits_pending"
    leg = f"ROW_NUMBER() OVER (ORDER BY a.address{_binary(db)}) - 1 AS leg, " if numbered else ""
    return (
        f"SELECT {leg}a.id AS account_id, a.credits_posted - a.debits_posted AS balance, "
        f"{available} AS available, {available} - :cap AS amount FROM accounts a "
        f"WHERE a.asset = :asset AND a.address LIKE 'member:%' AND {available} > :cap"
    )


def raw_move(db: Database, aux: Engine, *, opening: bool, temp: bool = True) -> float:
    """The epoch's transfers, postings and balances by plain SQL, in one transaction.

    With ``temp`` the legs are computed once into a temporary table (not logged), which
    the three statements read; otherwise each statement derives them again.
    """
    params: dict[str, Any] = {
        "asset": ASSET,
        "prefix": f"{uuid.uuid4()}:",
        "now": stamp(db, utcnow()),
        "kind": "allocation" if opening else "expiry",
        "address": "system:issuance" if opening else "system:expired",
    }
    make_legs = _open_legs if opening else _close_legs
    legs = make_legs(db, params, numbered=True)
    amounts = make_legs(db, params, numbered=False)
    if temp:
        with_legs = with_amounts = ""
    else:
        with_legs, with_amounts = f"WITH legs AS ({legs}) ", f"WITH legs AS ({amounts}) "
    tid = ":prefix || CAST(l.leg AS VARCHAR(20))"
    debit, credit = (":source", "l.account_id") if opening else ("l.account_id", ":source")
    member_side, sign = ("C", "+") if opening else ("D", "-")
    source_side, run = ("D", "-") if opening else ("C", "+")
    member_col, source_col = (
        ("credits_posted", "debits_posted") if opening else ("debits_posted", "credits_posted")
    )
    source_now = "(SELECT {} FROM accounts WHERE id = :source)"
    started = time.perf_counter()
    with aux.begin() as conn:
        params["source"] = conn.execute(
            text("SELECT id FROM accounts WHERE address = :address AND asset = :asset"), params
        ).scalar_one()
        if temp:
            drop = " ON COMMIT DROP" if db.sqlite_path is None else ""
            conn.execute(text(f"CREATE TEMPORARY TABLE legs{drop} AS {legs}"), params)
        conn.execute(
            text(
                f"{with_legs}INSERT INTO transfers (id, debit_account_id, credit_account_id, "
                "asset, amount, kind, phase, pending_id, state, timeout_at, memo, created_at) "
                f"SELECT {tid}, {debit}, {credit}, :asset, l.amount, :kind, 'posted', "
                "NULL, NULL, NULL, NULL, :now FROM legs l"
            ),
            params,
        )
        conn.execute(
            text(
                f"{with_legs}INSERT INTO postings (account_id, transfer_id, side, "
                "posted, pending, balance_after, available_after, created_at) "
                f"SELECT l.account_id, {tid}, '{member_side}', l.amount, 0, "
                f"l.balance {sign} l.amount, l.available {sign} l.amount, :now FROM legs l "
                f"UNION ALL SELECT :source, {tid}, '{source_side}', l.amount, 0, "
                f"{source_now.format('credits_posted - debits_posted')} "
                f"{run} SUM(l.amount) OVER (ORDER BY l.leg), "
                f"{source_now.format('credits_posted - debits_posted - debits_pending')} "
                f"{run} SUM(l.amount) OVER (ORDER BY l.leg), :now FROM legs l"
            ),
            params,
        )
        conn.execute(
            text(
                f"{with_amounts}UPDATE accounts "
                f"SET {member_col} = accounts.{member_col} + d.m, "
                f"{source_col} = accounts.{source_col} + d.s "
                "FROM (SELECT l.account_id AS id, l.amount AS m, 0 AS s FROM legs l UNION ALL "
                "SELECT :source, 0, coalesce(SUM(l.amount), 0) FROM legs l) d "
                "WHERE accounts.id = d.id"
            ),
            params,
        )
        if temp and db.sqlite_path is not None:
            conn.execute(text("DROP TABLE temp.legs"))
    return time.perf_counter() - started


# --- checks ---------------------------------------------------------------------------------


def check(aux: Engine, members: int, *, closed: bool, service: bool) -> None:
    """The balances, counts and running balances an epoch's open (or close) must leave."""
    standard = standard_members(members)
    total = standard * TIERS["standard"] + (members - standard) * TIERS["basic"]
    expired = standard * (TIERS["standard"] - CAP)
    params: dict[str, Any] = {"asset": ASSET}
    case, _ = _tier_case(params)
    expect = f"CASE m.tier {case} END"
    if closed:
        expect = f"CASE WHEN {expect} > :cap THEN :cap ELSE {expect} END"
        params["cap"] = CAP
    problems = []
    with aux.connect() as conn:

        def one(sql: str, **extra: Any) -> tuple[Any, ...]:
            row = conn.execute(text(sql), {**params, **extra}).one()
            return tuple(None if v is None else int(v) for v in row)

        got = one(
            "SELECT count(*), coalesce(sum(CASE WHEN a.credits_posted - a.debits_posted = "
            f"{expect} AND a.debits_pending = 0 THEN 1 ELSE 0 END), 0) "
            "FROM members m JOIN accounts a ON a.address = 'member:' || m.handle "
            f"AND a.asset = :asset WHERE m.handle NOT LIKE '{PROBE_PREFIX}%'"
        )
        if got != (members, members):
            problems.append(f"member accounts with the expected balance: {got}")
        for address, balance, kind, count in (
            ("system:issuance", -total, "allocation", members),
            ("system:expired", expired if closed else 0, "expiry", standard if closed else 0),
        ):
            account, value = one(
                "SELECT id, credits_posted - debits_posted FROM accounts "
                "WHERE address = :address AND asset = :asset",
                address=address,
            )
            if value != balance:
                problems.append(f"{address}: balance {value}, expected {balance}")
            last = conn.execute(
                text(
                    "SELECT balance_after FROM postings WHERE account_id = :id "
                    "ORDER BY id DESC LIMIT 1"
                ),
                {"id": account},
            ).scalar_one_or_none()
            if count and last != balance:
                problems.append(f"{address}: last balance_after {last}, expected {balance}")
            (transfers,) = one("SELECT count(*) FROM transfers WHERE kind = :kind", kind=kind)
            if transfers != count:
                problems.append(f"{kind} transfers: {transfers}, expected {count}")
        postings, transfers, zero = one(
            "SELECT (SELECT count(*) FROM postings), (SELECT count(*) FROM transfers), "
            "(SELECT sum(credits_posted - debits_posted) FROM accounts WHERE asset = :asset)"
        )
        if postings != 2 * transfers or zero != 0:
            problems.append(f"postings {postings}, transfers {transfers}, CU sum {zero}")
        if service:
            row = one(
                "SELECT members, applied, issued, expired_members, expired FROM epochs "
                "WHERE status = :status",
                status="closed" if closed else "open",
            )
            wanted = (members, members, total, *((standard, expired) if closed else (0, 0)))
            if row != wanted:
                problems.append(f"epochs row {row}, expected {wanted}")
    if problems:
        raise RuntimeError("check failed: " + "; ".join(problems))


# --- one size, in its own process -----------------------------------------------------------


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


@dataclass
class Ledger:
    """A fresh ledger to benchmark epochs on: its database, the write path's sessions and
    context, the operator's key, and a second engine for set-based setup and checks."""

    db: Database
    service: Engine
    aux: Engine
    sessions: Any
    ctx: Any
    keys: list[Any]


@contextlib.contextmanager
def fresh_ledger(engine: str, postgres_url: str, prefix: str) -> Iterator[Ledger]:
    """``ubc init`` in a temporary data dir, a fresh database migrated, the runtime's
    context loaded; everything dropped at the end."""
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmpdir,
        fresh_database(engine, postgres_url, Path(tmpdir)) as db,
    ):
        data_dir = Path(tmpdir) / "data"
        subprocess.run(
            [*ubc_command(), "init", "--data-dir", str(data_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        keys = [load_signing_key(data_dir / "operator.key")]
        service = make_engine(db.url)
        aux = make_engine(db.url)
        try:
            upgrade(service)
            sessions = make_session_factory(service)
            settings = Settings(
                database_url=db.url,
                data_dir=data_dir,
                origin=ORIGIN,
                enrollment="open",
                created_at_skew_seconds=SKEW_SECONDS,
            )
            with unit_of_work(sessions) as session:
                ctx = load_runtime(settings, session).ctx
            yield Ledger(db, service, aux, sessions, ctx, keys)
        finally:
            service.dispose()
            aux.dispose()


def bench_size(engine: str, members: int, runs: int, postgres_url: str) -> dict[str, Any]:
    with fresh_ledger(engine, postgres_url, "ubc-bench-epoch-") as ledger:
        db, aux, sessions = ledger.db, ledger.aux, ledger.sessions
        ctx, keys = ledger.ctx, ledger.keys
        started = time.perf_counter()
        populate(db, aux, members)
        db.vacuum(full=False)
        setup = time.perf_counter() - started
        log(f"  {engine} {members:,}: populated in {setup:.1f} s")
        rss_setup = maxrss_kib()
        clock = StatementClock(ledger.service)
        backend_peak: int | None = None
        results = []
        for run in range(runs):
            times = RunTimes()
            if run:
                reset(db, aux)
            db.checkpoint()
            clock.on = True
            service_open(sessions, ctx, keys, run + 1, times)
            clock.on = False
            if run == 0:  # ru_maxrss only grows: later runs follow a close
                rss_open = maxrss_kib()
            check(aux, members, closed=False, service=True)
            db.checkpoint()
            clock.on = True
            service_close(sessions, ctx, keys, run + 1, times)
            clock.on = False
            check(aux, members, closed=True, service=True)
            peak = db.backend_peak_kib()
            if peak is not None:
                backend_peak = max(backend_peak or 0, peak)
            rss_service = maxrss_kib()
            reset(db, aux)
            db.checkpoint()
            times.open_raw = raw_move(db, aux, opening=True)
            check(aux, members, closed=False, service=False)
            db.checkpoint()
            times.close_raw = raw_move(db, aux, opening=False)
            check(aux, members, closed=True, service=False)
            log(
                f"  {engine} {members:,} run {run + 1}: open {times.open_service:.2f} s "
                f"(envelope {times.open_envelope:.2f} s + {times.open_batches} batches), "
                f"raw {times.open_raw:.2f} s; close {times.close_service:.2f} s, "
                f"raw {times.close_raw:.2f} s; peak RSS {rss_service / 1024:.0f} MiB"
            )
            results.append(asdict(times))
        return {
            "engine": engine,
            "members": members,
            "runs": results,
            "setup_seconds": setup,
            "rss_setup_kib": rss_setup,
            "rss_open_kib": rss_open,
            "rss_service_kib": rss_service,
            "backend_peak_kib": backend_peak,
            "statements": clock.times,
            "server_version": db.server_version,
            "settings": db.settings,
        }


def run_child(engine: str, members: int, runs: int, postgres_url: str) -> dict[str, Any]:
    """``bench_size`` in a fresh interpreter, so that ``ru_maxrss`` is this size's own."""
    command = [
        sys.executable,
        __file__,
        "--child",
        f"{engine}:{members}",
        "--runs",
        str(runs),
        "--postgres-url",
        postgres_url,
    ]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- reporting ------------------------------------------------------------------------------


def _median(result: dict[str, Any], key: str) -> float:
    return float(statistics.median(r[key] for r in result["runs"]))


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:,.0f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | members | open (service) s | open (raw) s | ratio | close (service) s "
        "| close (raw) s | ratio | peak RSS MB | PostgreSQL backend peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        o_s, o_r = _median(r, "open_service"), _median(r, "open_raw")
        c_s, c_r = _median(r, "close_service"), _median(r, "close_raw")
        lines.append(
            f"| {r['engine']} | {r['members']:,} | {o_s:.2f} | {o_r:.2f} | {o_s / o_r:.2f}× "
            f"| {c_s:.2f} | {c_r:.2f} | {c_s / c_r:.2f}× | {_mib(r['rss_service_kib'])} "
            f"| {_mib(r['backend_peak_kib'])} |"
        )
    return "\n".join(lines)


def details(results: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | members | open: envelope s | open: batches | open: per batch s "
        "| members/s (open) | peak RSS MB: after setup, open, close | setup s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        envelope_s, total = _median(r, "open_envelope"), _median(r, "open_service")
        batches = int(_median(r, "open_batches"))
        per_batch = f"{(total - envelope_s) / batches:.2f}" if batches else "–"
        lines.append(
            f"| {r['engine']} | {r['members']:,} | {envelope_s:.2f} | {batches} | {per_batch} "
            f"| {r['members'] / total:,.0f} | {_mib(r['rss_setup_kib'])}, "
            f"{_mib(r['rss_open_kib'])}, {_mib(r['rss_service_kib'])} "
            f"| {r['setup_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _longest(r: dict[str, Any], key: str) -> str:
    values = [v for run in r["runs"] for v in run[key]]
    return f"{max(values) * 1000:,.0f} ({len(values) // len(r['runs'])})" if values else "–"


def locks(results: list[dict[str, Any]]) -> str:
    """How long each step held its lock: the longest over the runs, in ms (steps per run)."""
    lines = [
        "| engine | members | open entry ms | fix steps: longest ms (n) "
        "| allocation batches: longest ms (n) | close entry ms | close steps: longest ms (n) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        entry_open = max(run["open_envelope"] for run in r["runs"]) * 1000
        entry_close = max(run["close_envelope"] for run in r["runs"]) * 1000
        lines.append(
            f"| {r['engine']} | {r['members']:,} | {entry_open:,.0f} "
            f"| {_longest(r, 'fix_steps')} | {_longest(r, 'allocation_batches')} "
            f"| {entry_close:,.0f} | {_longest(r, 'close_steps')} |"
        )
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in results:
        o_s, o_r = _median(r, "open_service"), _median(r, "open_raw")
        if r["engine"] == "postgresql" and r["members"] >= 1_000_000:
            out.append(
                f"open of {r['members']:,} members on PostgreSQL: {o_s:.1f} s "
                f"({'under' if o_s < OPEN_TARGET_SECONDS else 'NOT under'} "
                f"{OPEN_TARGET_SECONDS:.0f} s), {o_s / o_r:.2f}× the raw ceiling "
                f"({'within' if o_s / o_r <= RATIO_TARGET else 'NOT within'} "
                f"{RATIO_TARGET:g}×)"
            )
    for engine in ENGINES:
        sizes = sorted((r for r in results if r["engine"] == engine), key=lambda r: r["members"])
        if len(sizes) < 2:
            continue
        small, big = sizes[0], sizes[-1]
        for phase, key in (("open", "rss_open_kib"), ("open and close", "rss_service_kib")):
            growth = big[key] / small[key]
            out.append(
                f"{engine}, peak RSS through {phase}: {_mib(small[key])} MB at "
                f"{small['members']:,} members, {_mib(big[key])} MB at {big['members']:,} "
                f"({growth:.2f}×, {(big[key] - small[key]) / 1024:+,.0f} MB: "
                f"{'flat' if growth <= FLAT else 'GROWS'} with the member count)"
            )
    return out


def statements(results: list[dict[str, Any]]) -> str:
    """Where the service's time goes, at the largest size of each engine."""
    lines = []
    for engine in ENGINES:
        sizes = [r for r in results if r["engine"] == engine]
        if not sizes:
            continue
        r = max(sizes, key=lambda r: r["members"])
        total = sum(x["open_service"] + x["close_service"] for x in r["runs"])
        lines += [
            "",
            f"{engine}, {r['members']:,} members, all runs, open and close ({total:.1f} s in all):",
            "",
            "| statement | calls | s | share |",
            "|---|---:|---:|---:|",
        ]
        timed = sorted(r["statements"].items(), key=lambda kv: -kv[1][1])
        shown = 0.0
        for label, (calls, seconds) in timed:
            shown += seconds
            if seconds / total < 0.005:
                continue
            cell = label.replace("|", "\\|")
            lines.append(f"| `{cell}` | {calls} | {seconds:.2f} | {seconds / total:.0%} |")
        rest = total - shown
        lines.append(
            f"| commits, journal append (COPY), Python, statements under 0.5% "
            f"| | {rest:.2f} | {rest / total:.0%} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_total() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / MIB:.0f} GiB"
    return "unknown"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="postgresql,sqlite", help="comma-separated")
    parser.add_argument(
        "--members",
        default=None,
        help="comma-separated sizes, each in its own process (default: "
        + "; ".join(f"{e} {s}" for e, s in DEFAULT_MEMBERS.items())
        + ")",
    )
    parser.add_argument("--runs", type=int, default=1, help="service and raw runs per size")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--markdown", action="store_true", help="print only the table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.child:
        engine, members = args.child.split(":")
        result = bench_size(engine, int(members), args.runs, args.postgres_url)
        print(json.dumps(result))
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine not in ENGINES:
            parser.error(f"unknown engine {engine!r}: choose from sqlite, postgresql")

    started = datetime.now(UTC)
    load_before = loadavg()
    results = []
    for engine in engines:
        sizes = [int(s) for s in (args.members or DEFAULT_MEMBERS[engine]).split(",")]
        for members in sizes:
            log(f"{engine}: {members:,} members, fresh database, {args.runs} run(s)")
            results.append(run_child(engine, members, args.runs, args.postgres_url))
    load_after = loadavg()

    if args.markdown:
        print(table(results))
        return 0
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"- command: python {' '.join([sys.argv[0], *sys.argv[1:]])}")
    print(
        f"- CPU: {cpu_model()}, nproc {len(os.sched_getaffinity(0))}, RAM {memory_total()}, "
        f"load average (1, 5, 15 min): {load_before} before, {load_after} after"
    )
    print(
        f"- Python {platform.python_version()}, SQLAlchemy {version('sqlalchemy')}, "
        f"psycopg {version('psycopg')}"
    )
    for engine in engines:
        r = next(r for r in results if r["engine"] == engine)
        name = "SQLite" if engine == "sqlite" else "PostgreSQL"
        print(f"- {name} {r['server_version']}: {r['settings']}")
    print(
        f"- tiers {TIERS} (30% basic, 70% standard), carryover cap {CAP}; "
        f"open steps and batches of {epochs.CHUNK:,} members, close steps of "
        f"{epochs.STEP:,} member accounts; {args.runs} run(s) per size, medians"
    )
    print()
    print(table(results))
    print()
    print(details(results))
    print()
    print(locks(results))
    print()
    for line in verdicts(results):
        print(f"- {line}")
    print(statements(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
