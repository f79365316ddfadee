"""Transfers per second through the ledger core against the raw ceiling of the database.

For each engine (SQLite, PostgreSQL) and each batch size (1, 100 and 1,000 transfers per
transaction) this measures, alternately and over several rounds:

- **core**: random member-to-member transfers of 1 CU, each its own ``LedgerRequest``
  with a unique id; a batch is one ``apply_many`` call inside one ``unit_of_work`` (one
  commit), on the engine and settings of ``ubc.db.make_engine``.
- **raw**: the ceiling of the same database on this machine: plain SQL doing only
  ``UPDATE`` debit account, ``UPDATE`` credit account and ``INSERT`` transfer per transfer,
  in its own two tables (``raw_accounts``, ``raw_transfers``) of the same database, with
  durable commits (``sqlite3`` in WAL mode with ``synchronous=FULL`` and ``BEGIN IMMEDIATE``;
  psycopg with ``synchronous_commit`` at the server default, one pipeline per transaction).

It reports the median transfers per second of each and the ratio core/raw. Every run
uses a fresh database per engine: an SQLite file in a temporary directory and a new
PostgreSQL database, dropped at the end.

    python scripts/bench_ledger.py --engines sqlite,postgresql --runs 5 --seconds 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import psycopg
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.ledger import service as ledger
from ubc.ledger.service import LedgerRequest, Leg
from ubc.migrations import upgrade

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ASSET = "CU"
FUNDING = 10**12  # per member: enough that no benchmark transfer is ever refused
TARGET = 0.5

# The raw ceiling: the same three statements per transfer on both engines.
RAW_SCHEMA = {
    "sqlite": (
        "CREATE TABLE raw_accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL)",
        # INTEGER PRIMARY KEY is SQLite's auto-incrementing 64-bit rowid (bigserial).
        "CREATE TABLE raw_transfers (id INTEGER PRIMARY KEY, debit BIGINT NOT NULL, "
        "credit BIGINT NOT NULL, amount BIGINT NOT NULL)",
    ),
    "postgresql": (
        "CREATE TABLE raw_accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)",
        "CREATE TABLE raw_transfers (id bigserial PRIMARY KEY, debit bigint NOT NULL, "
        "credit bigint NOT NULL, amount bigint NOT NULL)",
    ),
}
RAW_SQL = {
    "sqlite": (
        "UPDATE raw_accounts SET balance = balance - ? WHERE id = ?",
        "UPDATE raw_accounts SET balance = balance + ? WHERE id = ?",
        "INSERT INTO raw_transfers (debit, credit, amount) VALUES (?, ?, ?)",
    ),
    "postgresql": (
        "UPDATE raw_accounts SET balance = balance - %s WHERE id = %s",
        "UPDATE raw_accounts SET balance = balance + %s WHERE id = %s",
        "INSERT INTO raw_transfers (debit, credit, amount) VALUES (%s, %s, %s)",
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the two implementations --------------------------------------------------------------


class Core:
    """Transfers through ``ubc.ledger.service.apply_many``, one commit per batch."""

    def __init__(self, url: str, members: int, seed: int) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.addresses = [f"member:m{i:05d}" for i in range(members)]
        self.rng = random.Random(seed)
        self.prefix = f"bench-{os.getpid()}"
        self.next_id = 0
        self.transfers = 0
        with unit_of_work(self.sessions) as session:
            ledger.ensure_assets(session, {ASSET: 0})
            ledger.open_system_accounts(session, [ASSET])
            ledger.open_accounts(session, [(a, ASSET) for a in self.addresses])
            ledger.apply(
                session,
                LedgerRequest(
                    f"{self.prefix}-fund",
                    tuple(
                        Leg("system:issuance", a, ASSET, FUNDING, "allocation")
                        for a in self.addresses
                    ),
                ),
            )

    def transaction(self, size: int) -> None:
        rng, addresses, n = self.rng, self.addresses, len(self.addresses)
        requests = []
        for _ in range(size):
            debit = rng.randrange(n)
            credit = rng.randrange(n - 1)
            credit += credit >= debit  # a random other member
            self.next_id += 1
            requests.append(
                LedgerRequest(
                    f"{self.prefix}-{self.next_id}",
                    (Leg(addresses[debit], addresses[credit], ASSET, 1, "transfer"),),
                )
            )
        with unit_of_work(self.sessions) as session:
            outcomes = ledger.apply_many(session, requests)
        if not all(isinstance(o, ledger.Applied) for o in outcomes):
            raise RuntimeError(f"a benchmark transfer failed: {outcomes}")
        self.transfers += size

    def check(self) -> None:
        """Value is conserved and every transfer was recorded."""
        with unit_of_work(self.sessions) as session:
            accounts, transfers = ledger.accounts_t, ledger.transfers_t
            total = session.execute(
                select(func.sum(accounts.c.credits_posted - accounts.c.debits_posted)).where(
                    accounts.c.address.in_(self.addresses)
                )
            ).scalar_one()
            count = session.execute(select(func.count()).select_from(transfers)).scalar_one()
        expected = (len(self.addresses) * FUNDING, self.transfers + len(self.addresses))
        if (total, count) != expected:
            raise RuntimeError(f"core check failed: {(total, count)} != {expected}")

    def close(self) -> None:
        self.engine.dispose()


class RawSQLite:
    """The SQLite ceiling: ``sqlite3``, WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``."""

    def __init__(self, path: Path, members: int, seed: int) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.debit_sql, self.credit_sql, self.insert_sql = RAW_SQL["sqlite"]
        self.members = members
        self.rng = random.Random(seed)
        self.transfers = 0
        self.conn.execute("BEGIN IMMEDIATE")
        for statement in RAW_SCHEMA["sqlite"]:
            self.conn.execute(statement)
        self.conn.executemany(
            "INSERT INTO raw_accounts (id, balance) VALUES (?, ?)",
            [(i + 1, FUNDING) for i in range(members)],
        )
        self.conn.execute("COMMIT")

    def transaction(self, size: int) -> None:
        debits, credits, inserts = _raw_batch(self.rng, self.members, size)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(self.debit_sql, debits)
            conn.executemany(self.credit_sql, credits)
            conn.executemany(self.insert_sql, inserts)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self.transfers += size

    def check(self) -> None:
        total, count = self.conn.execute(
            "SELECT (SELECT sum(balance) FROM raw_accounts), (SELECT count(*) FROM raw_transfers)"
        ).fetchone()
        if (total, count) != (self.members * FUNDING, self.transfers):
            raise RuntimeError(f"raw check failed: {(total, count)}")

    def close(self) -> None:
        self.conn.close()


class RawPostgres:
    """The PostgreSQL ceiling: psycopg, pipelined ``executemany``, one round trip per commit."""

    def __init__(self, conninfo: str, members: int, seed: int) -> None:
        self.conn = psycopg.connect(conninfo)
        self.debit_sql, self.credit_sql, self.insert_sql = RAW_SQL["postgresql"]
        self.members = members
        self.rng = random.Random(seed)
        self.transfers = 0
        with self.conn.transaction(), self.conn.cursor() as cur:
            for statement in RAW_SCHEMA["postgresql"]:
                cur.execute(statement)
            cur.executemany(
                "INSERT INTO raw_accounts (id, balance) VALUES (%s, %s)",
                [(i + 1, FUNDING) for i in range(members)],
            )

    def transaction(self, size: int) -> None:
        debits, credits, inserts = _raw_batch(self.rng, self.members, size)
        conn = self.conn
        # BEGIN, the 3 x size statements and COMMIT go out in one pipeline: the only waits
        # are one network round trip and the server's WAL flush.
        with conn.pipeline(), conn.cursor() as cur:
            cur.executemany(self.debit_sql, debits)
            cur.executemany(self.credit_sql, credits)
            cur.executemany(self.insert_sql, inserts)
            conn.commit()
        self.transfers += size

    def check(self) -> None:
        row = self.conn.execute(
            "SELECT (SELECT sum(balance) FROM raw_accounts), (SELECT count(*) FROM raw_transfers)"
        ).fetchone()
        self.conn.rollback()
        assert row is not None
        if (int(row[0]), row[1]) != (self.members * FUNDING, self.transfers):
            raise RuntimeError(f"raw check failed: {row}")

    def close(self) -> None:
        self.conn.close()


def _raw_batch(
    rng: random.Random, members: int, size: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int, int]]]:
    debits, credits, inserts = [], [], []
    for _ in range(size):
        debit = rng.randrange(members)
        credit = rng.randrange(members - 1)
        credit += credit >= debit
        debit += 1
        credit += 1
        debits.append((1, debit))
        credits.append((1, credit))
        inserts.append((debit, credit, 1))
    return debits, credits, inserts


# --- databases ------------------------------------------------------------------------------


@dataclass
class Database:
    engine: str
    core_url: str
    server_version: str
    settings: dict[str, str] = field(default_factory=dict)
    sqlite_path: Path | None = None
    pg_conninfo: str | None = None


@contextlib.contextmanager
def fresh_database(engine: str, postgres_url: str) -> Iterator[Database]:
    if engine == "sqlite":
        with tempfile.TemporaryDirectory(prefix="ubc-bench-") as tmp:
            path = Path(tmp) / "bench.db"
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
    name = f"ubc_bench_{os.getpid()}"
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        conninfo = admin.set(database=name).render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            server_version = _show(conn, "server_version")
            settings = {
                s: _show(conn, s)
                for s in ("synchronous_commit", "fsync", "wal_sync_method", "commit_delay")
            }
        core_url = admin.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
        yield Database(engine, core_url, server_version, settings, pg_conninfo=conninfo)
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _show(conn: psycopg.Connection[tuple[object, ...]], setting: str) -> str:
    row = conn.execute(f"SHOW {setting}").fetchone()
    assert row is not None
    return str(row[0])


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Row:
    engine: str
    batch: int
    core: list[float]
    raw: list[float]

    @property
    def core_median(self) -> float:
        return statistics.median(self.core)

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw)

    @property
    def ratio(self) -> float:
        return self.core_median / self.raw_median


def measure(transaction: Callable[[int], None], batch: int, seconds: float) -> float:
    """Transfers per second over whole transactions for about ``seconds``."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        transaction(batch)
        done += batch
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def bench_engine(
    db: Database, batches: list[int], runs: int, seconds: float, members: int, seed: int
) -> list[Row]:
    core = Core(db.core_url, members, seed)
    raw: RawSQLite | RawPostgres
    if db.engine == "sqlite":
        assert db.sqlite_path is not None
        raw = RawSQLite(db.sqlite_path, members, seed + 1)
    else:
        assert db.pg_conninfo is not None
        raw = RawPostgres(db.pg_conninfo, members, seed + 1)
    rows = []
    try:
        for batch in batches:
            # Warm up (statement caches, prepared statements, buffer pool), not counted.
            for impl in (core, raw):
                for _ in range(max(3, 300 // batch)):
                    impl.transaction(batch)
            row = Row(db.engine, batch, [], [])
            for run in range(runs):
                # Alternate which goes first so neither always follows the other's checkpoint.
                order = [("core", core), ("raw", raw)]
                if run % 2:
                    order.reverse()
                for label, impl in order:
                    rate = measure(impl.transaction, batch, seconds)
                    getattr(row, label).append(rate)
                    log(
                        f"  {db.engine:<10} batch {batch:>5}  run {run + 1}  {label:<4}"
                        f" {rate:9.0f}/s"
                    )
            rows.append(row)
        core.check()
        raw.check()
    finally:
        raw.close()
        core.close()
    return rows


# --- reporting ------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| engine | transfers per transaction | core transfers/s | raw transfers/s "
        "| core/raw | target ≥ 50% | core runs (min–max) | raw runs (min–max) |",
        "|---|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.engine} | {r.batch:,} | {r.core_median:,.0f} | {r.raw_median:,.0f} "
            f"| {r.ratio:.0%} | {'yes' if r.ratio >= TARGET else 'no'} "
            f"| {min(r.core):,.0f}–{max(r.core):,.0f} | {min(r.raw):,.0f}–{max(r.raw):,.0f} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--batches", default="1,100,1000", help="transfers per transaction")
    parser.add_argument("--runs", type=int, default=5, help="rounds of core and raw (median)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--members", type=int, default=1000, help="member accounts")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--markdown", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine not in RAW_SQL:
            parser.error(f"unknown engine {engine!r}: choose from sqlite, postgresql")
    batches = [int(b) for b in args.batches.split(",")]

    started = datetime.now(UTC)
    load_before = loadavg()
    rows: list[Row] = []
    versions: dict[str, str] = {}
    settings: dict[str, dict[str, str]] = {}
    for engine in engines:
        log(f"{engine}: fresh database, {args.members} members")
        with fresh_database(engine, args.postgres_url) as db:
            versions[engine] = db.server_version
            settings[engine] = db.settings
            rows.extend(bench_engine(db, batches, args.runs, args.seconds, args.members, args.seed))
    load_after = loadavg()

    if args.markdown:
        print(table(rows))
        return 0
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"- command: python {' '.join([sys.argv[0], *sys.argv[1:]])}")
    print(f"- CPU: {cpu_model()}, nproc {len(os.sched_getaffinity(0))}")
    print(f"- load average (1, 5, 15 min): {load_before} before, {load_after} after")
    print(
        f"- Python {platform.python_version()}, SQLAlchemy {version('sqlalchemy')}, "
        f"psycopg {version('psycopg')}"
    )
    if "sqlite" in versions:
        print(f"- SQLite {versions['sqlite']}: {settings['sqlite']}")
    if "postgresql" in versions:
        print(f"- PostgreSQL {versions['postgresql']}: {settings['postgresql']}")
    print(
        f"- {args.members} members, amount 1, {args.runs} runs of {args.seconds:g} s each, "
        "core and raw alternating; medians"
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
