"""Epochs: allocation, expiry, batching, restart, and what the auditor catches.

Most tests drive the write path in-process (``ubc.envelopes.service.submit`` on a ledger
made by ``load_runtime``), which keeps the Hypothesis test fast; the batched path and the
restart run over a real server, whose background task applies an opening epoch.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import threading
import time
import unittest.mock
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from sqlalchemy import text
from sqlalchemy.engine import make_url

import ubc.app
import ubc.models
from tests.conftest import (
    POSTGRES_URL,
    REQUIRE_POSTGRES,
    LiveServer,
    _admin_conninfo,
    _postgres_problem,
    make_data_dir,
    run_server,
)
from ubc.audit.source import from_database, from_export, write_export
from ubc.audit.verify import Report, compare_with_database, verify_journal
from ubc.client import UbcApiError, UbcClient
from ubc.clock import SYSTEM_CLOCK
from ubc.config import Settings
from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.dbtypes import utcnow
from ubc.envelopes import service as envelopes
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.epochs import service as epochs
from ubc.errors import UbcError
from ubc.journal.checkpoint import format_checkpoint
from ubc.journal.merkle import append_leaves, leaf_hash, root_from_frontier
from ubc.ledger import service as ledger
from ubc.migrations import upgrade
from ubc.rules.writing import Prechecked, sign_internal
from ubc.runtime import load_runtime
from ubc.signing import (
    NoteSigner,
    canonical_json,
    encode_public_key,
    generate_signing_key,
    load_signing_key,
)

ORIGIN = "test.ubc/ledger"  # what tests.conftest.run_server uses
STARTS, ENDS = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"
TIERS = ("basic", "pro", "plus")


# --- one database per engine, emptied for each test ------------------------------------


def empty(url: str) -> None:
    """Every table of a migrated database emptied: much cheaper than a new database (a
    PostgreSQL DROP DATABASE takes seconds), so each Hypothesis example gets one too."""
    engine = make_engine(url)
    try:
        tables = [t.name for t in reversed(ubc.models.metadata.sorted_tables)]
        with engine.begin() as connection:
            for table in tables:  # DELETE: TRUNCATE makes new files, slower on small tables
                connection.execute(text(f"DELETE FROM {table}"))
    finally:
        engine.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def module_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path_factory.mktemp("epochs") / "ubc.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    template_name: str = request.getfixturevalue("postgres_template")
    name = f"ubc_epochs_{os.getpid()}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(module_db: str) -> str:
    """This module's database of each engine, empty and migrated (overrides conftest's)."""
    empty(module_db)
    return module_db


# --- an in-process ledger --------------------------------------------------------------


class Ledger:
    """A ledger driven through the write path in-process: envelopes, holds, reads, audit."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = make_session_factory(self.engine)
        with unit_of_work(self.sessions) as session:
            runtime = load_runtime(
                Settings(database_url=url, data_dir=data_dir, origin=ORIGIN), session
            )
        self.ctx = runtime.ctx
        self.vkey = str(runtime.info["vkey"])
        self.operator = load_signing_key(data_dir / "operator.key")
        self.ledger_key = load_signing_key(data_dir / "ledger.key")
        self.keys: dict[str, SigningKey] = {}
        self.last_hold = ""

    def close(self) -> None:
        self.engine.dispose()

    # writing

    def envelope(self, type_: str, signer: str, **fields: Any) -> dict[str, Any]:
        """An envelope signed by the operator (``signer="operator"``) or a member handle."""
        if signer == "operator":
            keys, actor = [self.operator], "operator"
        else:
            keys, actor = [self.keys[signer]], f"member:{signer}"
        body = {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(utcnow()),
            "actor": actor,
            **fields,
        }
        payload = validate_payload(type_, body)
        return envelopes.sign_payload(payload, type_, keys).to_json()

    def submit(self, *items: dict[str, Any]) -> list[envelopes.Outcome]:
        if not items:
            return []
        with unit_of_work(self.sessions) as session:
            return envelopes.submit(session, self.ctx, list(items))

    def accept(self, *items: dict[str, Any]) -> list[envelopes.Receipt]:
        outcomes = self.submit(*items)
        receipts = []
        for outcome in outcomes:
            assert isinstance(outcome, envelopes.Accepted), outcome
            assert not outcome.repeated
            receipts.append(outcome.receipt)
        return receipts

    def register(self, handle: str) -> dict[str, Any]:
        key = self.keys[handle] = generate_signing_key()
        return self.envelope(
            "member.register",
            handle,
            handle=handle,
            public_key=encode_public_key(bytes(key.verify_key)),
        )

    def send(self, sender: str, to: str, amount: int) -> dict[str, Any]:
        return self.envelope(
            "transfer",
            sender,
            **{"from": f"member:{sender}", "to": f"member:{to}", "asset": "CU", "amount": amount},
        )

    def open_(self, epoch: int, allocations: dict[str, int], cap: int | None) -> dict[str, Any]:
        return self.envelope(
            "epoch.open",
            "operator",
            epoch=epoch,
            asset="CU",
            allocations=allocations,
            carryover_cap=cap,
            starts_at=STARTS,
            ends_at=ENDS,
        )

    def close_(self, epoch: int) -> dict[str, Any]:
        return self.envelope("epoch.close", "operator", epoch=epoch)

    def hold(self, handle: str, amount: int, timeout: timedelta = timedelta(hours=1)) -> bool:
        """A pending model call: a hold from the member to system:consumption (not journaled),
        named as the gateway names its holds (the last one's id: ``last_hold``)."""
        leg = ledger.Leg(
            f"member:{handle}",
            "system:consumption",
            "CU",
            amount,
            "usage",
            timeout=timeout,
        )
        self.last_hold = f"hold:{uuid.uuid4()}"
        with self.sessions() as session:
            try:
                ledger.apply(session, ledger.LedgerRequest(self.last_hold, (leg,)))
                placed = True
            except UbcError:
                placed = False
            session.commit()
        return placed

    # reading

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.sessions() as session:
            return [tuple(r) for r in session.execute(text(sql), params)]

    def accounts(self) -> dict[str, tuple[int, int, int, int]]:
        """Every CU account: (posted, pending debits, pending credits, available)."""
        return {
            str(a): (int(cp) - int(dp), int(dpe), int(cpe), int(cp) - int(dp) - int(dpe))
            for a, dp, cp, dpe, cpe in self.query(
                "SELECT address, debits_posted, credits_posted, debits_pending, credits_pending "
                "FROM accounts WHERE asset = 'CU'"
            )
        }

    def legs(self, envelope_id: str) -> dict[str, tuple[str, str, int, str, str]]:
        """The transfers an envelope made: id → (debit, credit, amount, kind, phase)."""
        return {
            str(r[0]): (str(r[1]), str(r[2]), int(r[3]), str(r[4]), str(r[5]))
            for r in self.query(
                "SELECT t.id, d.address, c.address, t.amount, t.kind, t.phase FROM transfers t "
                "JOIN accounts d ON d.id = t.debit_account_id "
                "JOIN accounts c ON c.id = t.credit_account_id WHERE t.id LIKE :prefix",
                prefix=f"{envelope_id}:%",
            )
        }

    def state(self) -> tuple[Any, ...]:
        """What must not change when an envelope is refused."""
        return (
            self.accounts(),
            self.query("SELECT size FROM journal_head"),
            self.query("SELECT count(*) FROM transfers"),
            self.query("SELECT count(*) FROM postings"),
            self.query("SELECT number, status, applied, issued, expired FROM epochs"),
            self.query("SELECT epoch, leg, account_id, amount FROM epoch_allocations"),
            self.query("SELECT epoch, leg, account_id, amount FROM epoch_expiries"),
        )

    def epoch(self, number: int) -> epochs.EpochInfo:
        with self.sessions() as session:
            return epochs.get_epoch(session, number)

    def audit(self, *, against: bool = True) -> Report:
        live = self.url
        return verify_journal(
            from_database(live),
            self.vkey,
            against=(lambda url: compare_with_database(url, live)) if against else None,
        )


def check_invariants(accounts: dict[str, tuple[int, int, int, int]]) -> None:
    """Double entry (posted and pending each sum to 0) and nobody below zero."""
    assert sum(a[0] for a in accounts.values()) == 0
    assert sum(a[2] - a[1] for a in accounts.values()) == 0
    for address, (_, _, _, available) in accounts.items():
        if address.startswith(("member:", "cause:")):
            assert available >= 0, address


def rejected(outcome: envelopes.Outcome, status: int, type_: str | None = None) -> bool:
    return (
        isinstance(outcome, UbcError)
        and outcome.status_code == status
        and (type_ is None or outcome.error_type == type_)
    )


def same_receipt(replayed: envelopes.Outcome, original: envelopes.Receipt) -> None:
    """A replay answers 200 with the original seq, id, type and effects."""
    assert isinstance(replayed, envelopes.Accepted), replayed
    assert replayed.repeated
    assert replayed.status_code == 200
    body, first = replayed.receipt.body(), original.body()
    # The summary is left out here: see test_a_replayed_epoch_envelope_answers_its_summary.
    body.pop("summary", None)
    first.pop("summary", None)
    assert body == first


# --- 1. properties of open and close ---------------------------------------------------


@dataclass(frozen=True)
class Member:
    handle: str
    status: str  # pending (never admitted), active, suspended
    tier: str  # an allocated tier, or "guest" (admitted to a tier without allocation)
    deposit: int


@dataclass(frozen=True)
class Scenario:
    allocations: dict[str, int]
    cap: int | None
    members: list[Member]
    sends: list[tuple[int, int, int]]
    holds: list[tuple[int, int]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tiers = TIERS[: draw(st.integers(2, 3))]
    allocations = {t: draw(st.integers(1, 400)) for t in tiers}
    cap = draw(st.one_of(st.none(), st.just(0), st.integers(0, 600)))
    count = draw(st.integers(0, 40))
    members = [
        Member(
            # The separator changes the handle order (legs are numbered by handle).
            f"m{draw(st.sampled_from(['', '-', '_']))}{i:02d}",
            draw(st.sampled_from(["active", "active", "active", "suspended", "pending"])),
            draw(st.sampled_from([*tiers, "guest"])),
            draw(st.one_of(st.just(0), st.integers(1, 500))),
        )
        for i in range(count)
    ]
    sends: list[tuple[int, int, int]] = []
    holds: list[tuple[int, int]] = []
    if count >= 2:
        index = st.integers(0, count - 1)
        sends = draw(st.lists(st.tuples(index, index, st.integers(1, 600)), max_size=15))
        sends = [(a, b, amount) for a, b, amount in sends if a != b]
    if count and draw(st.booleans()):
        holds = draw(
            st.lists(st.tuples(st.integers(0, count - 1), st.integers(1, 400)), max_size=4)
        )
    return Scenario(allocations, cap, members, sends, holds)


@given(scenario=scenarios())
@settings(max_examples=12)
def test_open_and_close_allocate_and_expire_exactly(
    scenario: Scenario, db_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        make_data_dir(data_dir)
    empty(db_url)
    book = Ledger(db_url, data_dir)
    try:
        _run_scenario(book, scenario)
    finally:
        book.close()


def _run_scenario(book: Ledger, scenario: Scenario) -> None:
    members, allocations, cap = scenario.members, scenario.allocations, scenario.cap
    by_handle = {m.handle: m for m in members}
    book.accept(*[book.register(m.handle) for m in members])
    book.accept(
        *[
            book.envelope("member.admit", "operator", handle=m.handle, tier=m.tier)
            for m in members
            if m.status != "pending"
        ]
    )
    book.accept(
        *[
            book.envelope(
                "deposit",
                "operator",
                to=f"member:{m.handle}",
                asset="CU",
                amount=m.deposit,
                external_ref=f"fund-{m.handle}",
            )
            for m in members
            if m.deposit
        ]
    )
    book.accept(
        *[
            book.envelope("member.update", "operator", handle=m.handle, status="suspended")
            for m in members
            if m.status == "suspended"
        ]
    )
    before = book.accounts()
    posted = {m.handle: m.deposit for m in members}
    assert {h: before[f"member:{h}"][0] for h in posted} == posted

    # Open: every active member of an allocated tier, once, with its tier's amount.
    eligible = sorted(m.handle for m in members if m.status == "active" and m.tier in allocations)
    opened = book.open_(1, allocations, cap)
    [receipt] = book.accept(opened)
    open_id = receipt.id
    total = sum(allocations[by_handle[h].tier] for h in eligible)
    assert receipt.effects == []
    assert receipt.summary == {
        "epoch": 1,
        "asset": "CU",
        "members": len(eligible),
        "total": total,
        "tiers": {
            tier: {
                "members": sum(1 for h in eligible if by_handle[h].tier == tier),
                "amount": amount,
                "total": amount * sum(1 for h in eligible if by_handle[h].tier == tier),
            }
            for tier, amount in allocations.items()
        },
    }
    info = book.epoch(1)
    assert (info.status, info.members, info.applied, info.issued) == (
        "open",
        len(eligible),
        len(eligible),
        total,
    )
    assert book.legs(open_id) == {
        f"{open_id}:{leg}": (
            "system:issuance",
            f"member:{h}",
            allocations[by_handle[h].tier],
            "allocation",
            "posted",
        )
        for leg, h in enumerate(eligible)
    }
    for h in eligible:
        posted[h] += allocations[by_handle[h].tier]
    after_open = book.accounts()
    assert {h: after_open[f"member:{h}"][0] for h in posted} == posted
    assert after_open["system:issuance"][0] == before["system:issuance"][0] - total
    check_invariants(after_open)

    # Opening again does nothing: a replay answers the receipt, another open is refused.
    frozen = book.state()
    same_receipt(book.submit(opened)[0], receipt)
    assert rejected(book.submit(book.open_(1, allocations, cap))[0], 409, "state_conflict")
    assert rejected(book.submit(book.open_(2, allocations, cap))[0], 409, "state_conflict")
    assert book.state() == frozen

    # Activity: transfers (only active members may send, within what they can spend)
    # and holds of pending model calls.
    held = dict.fromkeys(posted, 0)
    expected_statuses = []
    for a, b, amount in scenario.sends:
        sender, receiver = members[a].handle, members[b].handle
        if members[a].status != "active":
            expected_statuses.append(403)
        elif amount > posted[sender]:
            expected_statuses.append(409)
        else:
            expected_statuses.append(201)
            posted[sender] -= amount
            posted[receiver] += amount
    outcomes = book.submit(
        *[book.send(members[a].handle, members[b].handle, n) for a, b, n in scenario.sends]
    )
    assert [o.status_code for o in outcomes] == expected_statuses
    for i, amount in scenario.holds:
        handle = members[i].handle
        placed = book.hold(handle, amount)
        assert placed == (amount <= posted[handle] - held[handle])
        if placed:
            held[handle] += amount
    before_close = book.accounts()
    for h in posted:
        assert before_close[f"member:{h}"][:2] == (posted[h], held[h])

    # Close: exactly max(0, available − cap) per member account, held compute untouched.
    expiry = {
        h: posted[h] - held[h] - cap
        for h in sorted(posted)
        if cap is not None and posted[h] - held[h] > cap
    }
    closing = book.close_(1)
    [closed] = book.accept(closing)
    assert closed.effects == []
    # The holds that limited an expiry are recorded for the auditor (holds are not journaled).
    recorded_holds = {
        f"member:{h}": held[h]
        for h in sorted(posted)
        if cap is not None and held[h] > 0 and posted[h] > cap
    }
    assert closed.summary == {
        "epoch": 1,
        "asset": "CU",
        "members": len(expiry),
        "total": sum(expiry.values()),
        **({"held": recorded_holds} if recorded_holds else {}),
    }
    assert book.legs(closed.id) == {
        f"{closed.id}:{leg}": (f"member:{h}", "system:expired", amount, "expiry", "posted")
        for leg, (h, amount) in enumerate(sorted(expiry.items(), key=lambda x: f"member:{x[0]}"))
    }
    info = book.epoch(1)
    assert (info.status, info.expired_members, info.expired) == (
        "closed",
        len(expiry),
        sum(expiry.values()),
    )
    after_close = book.accounts()
    for h in posted:
        posted[h] -= expiry.get(h, 0)
        assert after_close[f"member:{h}"][:2] == (posted[h], held[h])
        if cap is not None:
            assert after_close[f"member:{h}"][3] <= max(cap, 0)
    assert after_close["system:expired"][0] == sum(expiry.values())
    check_invariants(after_close)

    # Closing again does nothing either.
    frozen = book.state()
    same_receipt(book.submit(closing)[0], closed)
    assert rejected(book.submit(book.close_(1))[0], 409, "state_conflict")
    assert rejected(book.submit(book.close_(2))[0], 404)
    assert book.state() == frozen

    # The auditor re-derives both summaries and every transfer; the holds that limited an
    # expiry are recorded in the close's summary.
    report = book.audit()
    assert report.findings == []
    assert report.entries == book.query("SELECT size FROM journal_head")[0][0]


# --- problems found and fixed: replays, holds at close, collation, batch size ---------


@pytest.fixture
def book(db_url: str, tmp_path: Path) -> Iterator[Ledger]:
    made = Ledger(db_url, make_data_dir(tmp_path / "data"))
    yield made
    made.close()


def small_epoch(book: Ledger, handles: list[str], *, tier: str = "basic") -> None:
    book.accept(*[book.register(h) for h in handles])
    book.accept(*[book.envelope("member.admit", "operator", handle=h, tier=tier) for h in handles])


def test_a_replayed_epoch_envelope_answers_its_summary(book: Ledger) -> None:
    small_epoch(book, ["alice", "bob"])
    opened = book.open_(1, {"basic": 100}, 10)
    [first] = book.accept(opened)
    replayed = book.submit(opened)[0]
    assert isinstance(replayed, envelopes.Accepted)
    assert replayed.receipt.body() == first.body()


def test_a_hold_open_at_close_audits_clean(book: Ledger) -> None:
    small_epoch(book, ["alice", "bob"])
    book.accept(book.open_(1, {"basic": 100}, 10))
    assert book.hold("alice", 30)
    [closed] = book.accept(book.close_(1))
    assert closed.summary == {
        "epoch": 1,
        "asset": "CU",
        "members": 2,
        "total": 150,
        "held": {"member:alice": 30},
    }
    assert book.accounts()["member:alice"] == (40, 30, 0, 10)  # the hold was not expired
    assert book.audit(against=False).findings == []


def test_a_pending_hold_is_no_against_finding(book: Ledger) -> None:
    small_epoch(book, ["alice", "bob"])
    book.accept(book.open_(1, {"basic": 100}, None))
    assert book.hold("alice", 30)
    assert book.audit().findings == []


def test_monkeypatching_chunk_sets_the_background_batch(
    book: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(epochs, "CHUNK", 2)
    small_epoch(book, ["alice", "bob", "carol", "dave", "erin"])
    book.accept(book.open_(1, {"basic": 100}, None))
    assert book.epoch(1).applied == 0
    assert background_round(book)
    assert book.epoch(1).applied == 2


@pytest.mark.postgres
def test_leg_numbers_do_not_depend_on_the_database_collation(tmp_path: Path) -> None:
    problem = _postgres_problem()
    if problem is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(problem)
        pytest.skip(problem)
    name = f"ubc_icu_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        try:
            conn.execute(
                f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
                "ICU_LOCALE 'en' LOCALE 'C.UTF-8'"
            )
        except psycopg.Error as exc:
            pytest.skip(f"no ICU collation here: {exc}")
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        book = Ledger(url, make_data_dir(tmp_path / "data"))
        try:
            small_epoch(book, ["ann-c", "annb", "ann_b"])
            book.accept(book.open_(1, {"basic": 100}, 10))
            book.accept(book.close_(1))
            assert book.audit().findings == []
        finally:
            book.close()
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- 2. and 3. the batched path, over a server -----------------------------------------


class Gate:
    """Stands for ``ubc.app._advance_once``: the server's background task applies one
    batch of an opening epoch per ``step()``, and nothing otherwise."""

    def __init__(self, real: Callable[[Any], bool]) -> None:
        self.real = real
        self.tokens = threading.Semaphore(0)

    def __call__(self, app: Any) -> bool:
        if not self.tokens.acquire(timeout=0.1):
            return False
        return self.real(app)

    def step(self) -> None:
        self.tokens.release()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    """Batches of 3 legs, applied only when the test says so."""
    monkeypatch.setattr(epochs, "CHUNK", 3)
    made = Gate(ubc.app._advance_once)
    monkeypatch.setattr(ubc.app, "_advance_once", made)
    return made


@dataclass
class Http:
    """The operator's view of a served ledger, and its members' clients."""

    server: LiveServer
    op: UbcClient
    reader: httpx.Client
    members: dict[str, UbcClient]

    def epoch(self, number: int) -> dict[str, Any]:
        response = self.reader.get(f"/api/epochs/{number}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def posted(self) -> dict[str, int]:
        response = self.reader.get("/api/accounts")
        assert response.status_code == 200, response.text
        return {
            a["address"]: a["posted"] for a in response.json()["accounts"] if a["asset"] == "CU"
        }

    def legs(self, envelope_id: str) -> dict[str, tuple[str, str, int, str]]:
        """Legs ``<id>:0``, ``<id>:1``, ... up to the first that does not exist."""
        found: dict[str, tuple[str, str, int, str]] = {}
        for leg in itertools.count():
            response = self.reader.get(f"/api/transfers/{envelope_id}:{leg}")
            if response.status_code == 404:
                return found
            assert response.status_code == 200, response.text
            [t] = response.json()["transfers"]
            found[t["transfer_id"]] = (t["debit"], t["credit"], t["amount"], t["kind"])
        raise AssertionError("unreachable")

    def wait(self, number: int, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            info = self.epoch(number)
            if done(info):
                return info
            assert time.monotonic() < deadline, info
            time.sleep(0.02)

    def open_(self, allocations: dict[str, int], cap: int | None, epoch: int = 1) -> dict[str, Any]:
        return self.op.envelope(
            "epoch.open",
            epoch=epoch,
            asset="CU",
            allocations=allocations,
            carryover_cap=cap,
            starts_at=STARTS,
            ends_at=ENDS,
        )

    def audit(self) -> Report:
        live = self.server.db_url
        return verify_journal(
            from_database(live),
            self.op.ledger_info()["vkey"],
            against=lambda url: compare_with_database(url, live),
        )

    def close(self) -> None:
        for client in [self.op, *self.members.values()]:
            client.close()
        self.reader.close()


@contextlib.contextmanager
def served(server: LiveServer, tiers: dict[str, str | None]) -> Iterator[Http]:
    """Members registered (and admitted to their tier unless None) in two batches."""
    op = UbcClient(server.url, origin=ORIGIN, key=server.operator_key, token=server.operator_token)
    members = {
        h: UbcClient(
            server.url,
            origin=ORIGIN,
            key=generate_signing_key(),
            handle=h,
            token=server.operator_token,
        )
        for h in tiers
    }
    reader = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.operator_token}"}
    )
    http = Http(server, op, reader, members)
    try:
        registrations = [
            c.envelope(
                "member.register",
                handle=h,
                public_key=encode_public_key(bytes(c.key.verify_key)),  # type: ignore[union-attr]
            )
            for h, c in members.items()
        ]
        admissions = [op.envelope("member.admit", handle=h, tier=t) for h, t in tiers.items() if t]
        for batch in (registrations, admissions):
            if batch:
                assert all(r.ok for r in op.submit_batch(batch))
        yield http
    finally:
        http.close()


def refused(call: Callable[[], object], status: int, type_: str) -> None:
    with pytest.raises(UbcApiError) as info:
        call()
    assert (info.value.status, info.value.type) == (status, type_)


def test_a_large_epoch_is_applied_in_batches(db_url: str, tmp_path: Path, gate: Gate) -> None:
    allocations = {"basic": 100, "pro": 250}
    eligible = {f"u{i:02d}": "basic" if i % 3 else "pro" for i in range(18)} | {"susp": "pro"}
    tiers: dict[str, str | None] = {**eligible, "guest": "guest", "late": None}
    order = sorted(eligible)  # legs are numbered by handle
    with (
        run_server(db_url, make_data_dir(tmp_path / "data")) as server,
        served(server, tiers) as http,
    ):
        op, members = http.op, http.members
        before = http.posted()
        opened: dict[str, Any] = dict(op.submit(http.open_(allocations, 120)))
        assert opened["summary"]["members"] == 19
        info = http.epoch(1)
        assert (info["status"], info["members"], info["applied"]) == ("opening", 19, 0)
        assert op.ledger_info()["current_epoch"] == 1

        # While it is opening: no close, no other epoch; the member set is already fixed.
        refused(lambda: op.submit(op.envelope("epoch.close", epoch=1)), 409, "state_conflict")
        refused(lambda: op.submit(http.open_(allocations, None, epoch=2)), 409, "state_conflict")
        op.admit("late", "basic")
        op.update_member("susp", status="suspended")
        refused(lambda: members[order[-1]].send(order[0], 1), 409, "insufficient_funds")

        progress = [0]
        while progress[-1] < 19:
            gate.step()
            info = http.wait(1, lambda i: i["applied"] > progress[-1])
            progress.append(info["applied"])
            assert info["status"] == ("open" if info["applied"] == 19 else "opening")
            if len(progress) == 2:
                posted = http.posted()
                assert [posted[f"member:{h}"] for h in order[:4]] == [
                    *(allocations[eligible[h]] for h in order[:3]),
                    0,
                ]
        assert progress == [0, 3, 6, 9, 12, 15, 18, 19]
        assert info["issued"] == sum(allocations[t] for t in eligible.values())

        # Every member of the set once, with its tier's amount; nobody else anything.
        assert http.legs(opened["id"]) == {
            f"{opened['id']}:{leg}": (
                "system:issuance",
                f"member:{h}",
                allocations[eligible[h]],
                "allocation",
            )
            for leg, h in enumerate(order)
        }
        posted = http.posted()
        for h in tiers:
            assert posted[f"member:{h}"] == allocations.get(str(eligible.get(h)), 0), h
        assert posted["system:issuance"] == before["system:issuance"] - info["issued"]

        members["u01"].send("u02", 40)
        members["u00"].send("late", 200)
        closed: dict[str, Any] = dict(op.submit(op.envelope("epoch.close", epoch=1)))
        posted_before_close = posted | {
            "member:u01": 60,
            "member:u02": 140,
            "member:u00": 50,
            "member:late": 200,
        }
        expiry = {
            a: p - 120
            for a, p in sorted(posted_before_close.items())
            if a.startswith("member:") and p > 120
        }
        assert closed["summary"] == {
            "epoch": 1,
            "asset": "CU",
            "members": len(expiry),
            "total": sum(expiry.values()),
        }
        assert http.legs(closed["id"]) == {
            f"{closed['id']}:{leg}": (address, "system:expired", amount, "expiry")
            for leg, (address, amount) in enumerate(expiry.items())
        }
        assert http.epoch(1)["status"] == "closed"
        assert http.audit().findings == []


def test_the_legs_of_an_epoch_are_listed_by_its_envelope_id(db_url: str, tmp_path: Path) -> None:
    with (
        run_server(db_url, make_data_dir(tmp_path / "data")) as server,
        served(server, {"alice": "basic", "bob": "basic"}) as http,
    ):
        opened = http.op.submit(http.open_({"basic": 100}, None))
        assert len(http.legs(opened["id"])) == 2  # each leg by its own id: fine
        response = http.reader.get(f"/api/transfers/{opened['id']}")
        assert response.status_code == 200, response.text
        assert len(response.json()["transfers"]) == 2


def test_a_restart_finishes_an_epoch_left_half_applied(
    db_url: str, tmp_path: Path, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocations = {"basic": 100, "pro": 250}
    eligible = {f"r{i:02d}": "basic" if i % 2 else "pro" for i in range(10)}
    data_dir = make_data_dir(tmp_path / "data")
    with run_server(db_url, data_dir) as server, served(server, dict(eligible)) as http:
        opened = http.op.submit(http.open_(allocations, 150))
        gate.step()
        http.wait(1, lambda i: i["applied"] == 3)
    # The server stopped with the epoch still opening.
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT status, applied FROM epochs")).one()
    finally:
        engine.dispose()
    assert tuple(row) == ("opening", 3)

    monkeypatch.setattr(ubc.app, "_advance_once", gate.real)
    with run_server(db_url, data_dir) as server, served(server, {}) as http:
        info = http.wait(1, lambda i: i["status"] == "open")
        assert (info["applied"], info["members"]) == (10, 10)
        order = sorted(eligible)
        assert http.legs(opened["id"]) == {
            f"{opened['id']}:{leg}": (
                "system:issuance",
                f"member:{h}",
                allocations[eligible[h]],
                "allocation",
            )
            for leg, h in enumerate(order)
        }
        posted = http.posted()
        assert {h: posted[f"member:{h}"] for h in eligible} == {
            h: allocations[t] for h, t in eligible.items()
        }
        # The client's Receipt type has no `summary` key (epoch receipts carry one).
        closed: dict[str, Any] = dict(http.op.submit(http.op.envelope("epoch.close", epoch=1)))
        assert closed["summary"]["total"] == 100 * sum(1 for t in eligible.values() if t == "pro")
        assert http.audit().findings == []


# --- 4. what the auditor catches -------------------------------------------------------


@dataclass
class Built:
    """A closed epoch: ada (basic, deposit 100), bea (basic), cyd and dot (pro), cap 150."""

    url: str
    vkey: str
    ledger_key: SigningKey
    open_id: str
    open_seq: int
    close_id: str
    close_seq: int


@pytest.fixture
def built(db_url: str, tmp_path: Path) -> Built:
    book = Ledger(db_url, make_data_dir(tmp_path / "data"))
    try:
        small_epoch(book, ["ada", "bea"])
        small_epoch(book, ["cyd", "dot"], tier="pro")
        book.accept(
            book.envelope(
                "deposit", "operator", to="member:ada", asset="CU", amount=100, external_ref="x1"
            )
        )
        [opened] = book.accept(book.open_(1, {"basic": 100, "pro": 250}, 150))
        [closed] = book.accept(book.close_(1))
        assert closed.summary == {"epoch": 1, "asset": "CU", "members": 3, "total": 250}
        posted = {a: v[0] for a, v in book.accounts().items() if a.startswith("member:")}
        assert posted == {
            "member:ada": 150,
            "member:bea": 100,
            "member:cyd": 150,
            "member:dot": 150,
        }
        assert book.audit().findings == []
        return Built(
            db_url, book.vkey, book.ledger_key, opened.id, opened.seq, closed.id, closed.seq
        )
    finally:
        book.close()


def tamper(url: str, *statements: tuple[str, dict[str, Any]]) -> None:
    """Write straight into the live database, past ubc: how an intruder would."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for sql, params in statements:
                connection.execute(text(sql), params)
    finally:
        engine.dispose()


def account_id(address: str) -> str:
    """SQL for the row id of a CU account."""
    return f"(SELECT id FROM accounts WHERE address = '{address}' AND asset = 'CU')"


def audit_against(built: Built) -> Report:
    return verify_journal(
        from_database(built.url),
        built.vkey,
        against=lambda url: compare_with_database(url, built.url),
    )


def rules_at(report: Report) -> set[tuple[int | None, str]]:
    return {(f.seq, f.rule) for f in report.findings}


def test_a_forged_extra_allocation_is_caught(built: Built) -> None:
    forged, first = f"{built.open_id}:4", f"{built.open_id}:0"  # legs 0..3 are real
    bea = account_id("member:bea")
    tamper(
        built.url,
        (
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, asset, amount, "
            "kind, phase, pending_id, state, timeout_at, memo, created_at) SELECT :forged, "
            f"debit_account_id, {bea}, asset, 77, kind, phase, pending_id, state, timeout_at, "
            "memo, created_at FROM transfers WHERE id = :first",
            {"forged": forged, "first": first},
        ),
        (
            "INSERT INTO postings (account_id, transfer_id, side, posted, pending, "
            f"balance_after, available_after, created_at) SELECT CASE WHEN side = 'C' THEN {bea} "
            "ELSE account_id END, :forged, side, 77, 0, balance_after, available_after, "
            "created_at FROM postings WHERE transfer_id = :first",
            {"forged": forged, "first": first},
        ),
        (f"UPDATE accounts SET credits_posted = credits_posted + 77 WHERE id = {bea}", {}),
        (
            "UPDATE accounts SET debits_posted = debits_posted + 77 "
            "WHERE address = 'system:issuance' AND asset = 'CU'",
            {},
        ),
    )
    report = audit_against(built)
    assert rules_at(report) == {
        (built.open_seq, "transfer.against"),
        (built.open_seq, "posting.against"),
        (None, "balance.against"),
    }
    [transfer] = [f for f in report.findings if f.rule == "transfer.against"]
    assert forged in transfer.expected
    assert "member:bea" in transfer.found
    balances = sorted(f.expected for f in report.findings if f.rule == "balance.against")
    assert balances == ["member:bea CU posted 100", "system:issuance CU posted -700"]


def test_a_missing_allocation_is_caught(built: Built) -> None:
    missing = f"{built.open_id}:0"  # ada, the first handle
    tamper(
        built.url,
        ("DELETE FROM postings WHERE transfer_id = :id", {"id": missing}),
        ("DELETE FROM transfers WHERE id = :id", {"id": missing}),
        (
            "UPDATE accounts SET credits_posted = credits_posted - 100 "
            "WHERE address = 'member:ada' AND asset = 'CU'",
            {},
        ),
        (
            "UPDATE accounts SET debits_posted = debits_posted - 100 "
            "WHERE address = 'system:issuance' AND asset = 'CU'",
            {},
        ),
    )
    report = audit_against(built)
    assert rules_at(report) == {
        (built.open_seq, "transfer.against"),
        (built.open_seq, "posting.against"),
        (None, "balance.against"),
    }
    [transfer] = [f for f in report.findings if f.rule == "transfer.against"]
    assert missing in transfer.expected
    assert "member:ada" in transfer.expected
    assert transfer.found == "live None"
    balances = sorted(f.expected for f in report.findings if f.rule == "balance.against")
    assert balances == ["member:ada CU posted 150", "system:issuance CU posted -700"]


def test_a_wrong_expiry_in_the_database_is_caught(built: Built) -> None:
    cyd = f"{built.close_id}:1"  # expiry legs by address: ada, cyd, dot
    tamper(built.url, ("UPDATE transfers SET amount = 60 WHERE id = :id", {"id": cyd}))
    report = audit_against(built)
    [finding] = report.findings
    assert (finding.seq, finding.rule) == (built.close_seq, "transfer.against")
    assert cyd in finding.expected
    assert "member:cyd" in finding.expected
    assert ", 100, 'expiry'" in finding.expected
    assert ", 60, 'expiry'" in finding.found


def export_of(built: Built, path: Path) -> tuple[dict[str, Any], list[bytes]]:
    with path.open("w", encoding="utf-8") as out:
        write_export(from_database(built.url), out, origin=ORIGIN)
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = [base64.b64decode(json.loads(line)["entry"]) for line in lines[1:]]
    return json.loads(lines[0]), entries


def write_resigned(built: Built, path: Path, header: dict[str, Any], entries: list[bytes]) -> Path:
    """The export with a checkpoint over the entries as they are now, under the ledger key."""
    frontier: list[bytes] = []
    for position, entry in enumerate(entries):
        frontier = append_leaves(position, frontier, [leaf_hash(entry)])[1]
    size = len(entries)
    note = format_checkpoint(ORIGIN, size, root_from_frontier(size, frontier))
    header = {**header, "size": size, "checkpoint": NoteSigner(ORIGIN, built.ledger_key).sign(note)}
    lines = [json.dumps(header)] + [
        json.dumps({"seq": seq, "entry": base64.b64encode(entry).decode()})
        for seq, entry in enumerate(entries)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("which", ["open", "close"])
def test_a_wrong_summary_under_a_good_checkpoint_is_caught(
    built: Built, tmp_path: Path, which: str
) -> None:
    header, entries = export_of(built, tmp_path / "export.jsonl")
    clean = write_resigned(built, tmp_path / "clean.jsonl", header, entries)
    assert verify_journal(from_export(clean), built.vkey).findings == []

    seq = built.open_seq if which == "open" else built.close_seq
    body = json.loads(entries[seq])
    summary = body["summary"]
    if which == "open":
        # basic at 120 instead of 100, the totals made to agree
        summary["tiers"]["basic"] |= {"amount": 120, "total": 240}
        summary["total"] += 40
    else:
        summary["total"] -= 1
    entries[seq] = canonical_json(body)
    edited = write_resigned(built, tmp_path / "edited.jsonl", header, entries)
    report = verify_journal(from_export(edited), built.vkey)
    assert rules_at(report) == {(seq, f"summary.epoch.{which}")}


# --- 5. a close in steps --------------------------------------------------------------
#
# The close entry expires the first ``epochs.STEP`` member accounts (in code-point order
# of their addresses); if more are left the epoch is ``closing`` and the server journals
# ``epoch.expire`` steps over the next ones until none is left. Every step holds the
# journal's lock only for its own accounts, and computes each member's expiry from what
# the member can spend at that step's position: transfers, model calls' holds and new
# members between steps count exactly as they would before a whole close.


def next_step(book: Ledger) -> bool:
    """One round of the server's close task: the next ``epoch.expire`` step, if any."""
    with unit_of_work(book.sessions) as session:
        return epochs.next_close_step(session, book.ctx, now=utcnow(), submit=envelopes.submit)


def step_ids(book: Ledger) -> list[str]:
    rows = book.query("SELECT envelope_id FROM epoch_close_steps ORDER BY first_leg, through")
    return [str(r[0]) for r in rows]


@dataclass(frozen=True)
class Between:
    """What happens between two steps of a close."""

    sends: list[tuple[int, int, int]]
    holds: list[tuple[int, int]]
    newcomers: list[str]


@st.composite
def stepped_closes(draw: st.DrawFn) -> tuple[list[str], list[int], int, int, list[Between]]:
    count = draw(st.integers(1, 9))
    handles = [f"m{draw(st.sampled_from(['', '-', '_']))}{i:02d}" for i in range(count)]
    deposits = [draw(st.integers(0, 300)) for _ in handles]
    cap = draw(st.integers(0, 250))
    size = draw(st.integers(1, 4))
    index = st.integers(0, count - 1)
    rounds = [
        Between(
            draw(st.lists(st.tuples(index, index, st.integers(1, 300)), max_size=3)),
            draw(st.lists(st.tuples(index, st.integers(1, 200)), max_size=2)),
            draw(st.lists(st.sampled_from(["aa0", "mz9", "m-50", "zz1", "m00x"]), max_size=1)),
        )
        for _ in range(count // size + 2)
    ]
    return handles, deposits, cap, size, rounds


@given(case=stepped_closes())
@settings(max_examples=10, deadline=None)
def test_a_close_in_steps_expires_each_member_at_its_step(
    case: tuple[list[str], list[int], int, int, list[Between]], db_url: str, tmp_path: Path
) -> None:
    handles, deposits, cap, size, rounds = case
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        make_data_dir(data_dir)
    empty(db_url)
    book = Ledger(db_url, data_dir)
    try:
        with unittest.mock.patch.object(epochs, "STEP", size):
            _run_stepped_close(book, handles, deposits, cap, size, rounds)
    finally:
        book.close()


def _run_stepped_close(
    book: Ledger,
    handles: list[str],
    deposits: list[int],
    cap: int,
    size: int,
    rounds: list[Between],
) -> None:
    small_epoch(book, handles)
    book.accept(
        *[
            book.envelope(
                "deposit",
                "operator",
                to=f"member:{h}",
                asset="CU",
                amount=d,
                external_ref=f"fund-{h}",
            )  # fmt: skip
            for h, d in zip(handles, deposits, strict=True)
            if d
        ]
    )
    book.accept(book.open_(1, {"basic": 100}, cap))
    posted = {h: d + 100 for h, d in zip(handles, deposits, strict=True)}
    held = dict.fromkeys(handles, 0)
    expected_expiry: dict[str, int] = {}
    cursor = ""

    def covered(after: str) -> list[str]:
        """The handles the next step covers (as the server chooses its range)."""
        later = sorted(a for a in (f"member:{h}" for h in posted) if a > after)
        return [a.removeprefix("member:") for a in later[:size]]

    def expire(members: list[str]) -> None:
        for h in members:
            expires = max(posted[h] - held[h] - cap, 0)
            expected_expiry[h] = expires
            posted[h] -= expires

    # The close entry is the first step.
    first = covered(cursor)
    [closed] = book.accept(book.close_(1))
    expire(first)
    cursor = f"member:{first[-1]}" if first else cursor
    status = book.epoch(1).status
    assert status == ("closed" if not covered(cursor) else "closing")
    assert closed.summary is not None
    assert closed.summary["members"] == sum(1 for h in first if expected_expiry[h])
    for between in rounds:
        if status == "closed":
            break
        # Activity between steps: transfers, holds of model calls, new members.
        for a, b, amount in between.sends:
            sender, receiver = handles[a], handles[b]
            [outcome] = book.submit(book.send(sender, receiver, amount))
            ok = sender != receiver and amount <= posted[sender] - held[sender]
            assert outcome.status_code == (201 if ok else (400 if sender == receiver else 409))
            if ok:
                posted[sender] -= amount
                posted[receiver] += amount
        for i, amount in between.holds:
            placed = book.hold(handles[i], amount)
            assert placed == (amount <= posted[handles[i]] - held[handles[i]])
            held[handles[i]] += amount if placed else 0
        for newcomer in between.newcomers:
            if newcomer not in posted:
                book.accept(book.register(newcomer))
                posted[newcomer], held[newcomer] = 0, 0
        members = covered(cursor)
        assert next_step(book)
        expire(members)
        cursor = f"member:{members[-1]}" if members else cursor
        status = book.epoch(1).status
        assert status == ("closed" if not covered(cursor) else "closing")
    assert status == "closed"
    assert not next_step(book)  # nothing left to do
    accounts = book.accounts()
    for h in posted:
        assert accounts[f"member:{h}"][:2] == (posted[h], held[h]), h
    assert accounts["system:expired"][0] == sum(expected_expiry.values())
    info = book.epoch(1)
    assert (info.expired_members, info.expired) == (
        sum(1 for v in expected_expiry.values() if v),
        sum(expected_expiry.values()),
    )
    check_invariants(accounts)
    assert book.audit().findings == []


def test_a_close_runs_in_steps_that_the_auditor_re_derives(
    book: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(epochs, "STEP", 2)
    handles = ["ann", "bea", "cyd", "dot", "eve"]
    small_epoch(book, handles)
    book.accept(book.open_(1, {"basic": 100}, 30))
    [closed] = book.accept(book.close_(1))
    # The first step: ann and bea; the rest later.
    assert closed.summary == {
        "epoch": 1,
        "asset": "CU",
        "members": 2,
        "total": 140,
        "through": "member:bea",
    }
    info = book.epoch(1)
    assert (info.status, info.close_cursor, info.expired_members) == ("closing", "member:bea", 2)
    # While closing: no other close, no new epoch; transfers go on.
    assert rejected(book.submit(book.close_(1))[0], 409, "state_conflict")
    assert rejected(book.submit(book.open_(2, {"basic": 1}, None))[0], 409, "state_conflict")
    book.accept(book.send("ann", "dot", 30))  # dot's expiry is still to come: it counts
    book.accept(book.send("cyd", "bea", 50))  # bea's was done: it keeps what it gets
    assert book.hold("eve", 60)  # a model call's hold on eve, not journaled: recorded
    # A model call on dot held and settled (its hold expired, journaled) before its step.
    assert book.hold("dot", 90, timeout=timedelta(seconds=1))
    expire = validate_payload(
        "hold.expire",
        {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(utcnow() + timedelta(seconds=2)),
            "actor": "ledger",
            "hold_id": f"{book.last_hold}:0",
        },
    )
    with unit_of_work(book.sessions) as session:
        [settled] = envelopes.submit(
            session,
            book.ctx,
            [sign_internal(book.ctx, expire, "hold.expire")],
            now=utcnow() + timedelta(seconds=2),
        )
    assert isinstance(settled, envelopes.Accepted), settled
    # A step that does not start where the close is refused, and changes nothing.
    frozen = book.state()
    wrong = ledger_step(book, after="member:ann", through="member:cyd")
    with unit_of_work(book.sessions) as session:
        assert rejected(envelopes.submit(session, book.ctx, [wrong])[0], 409, "state_conflict")
    # Only the ledger signs a step.
    forged = book.envelope("epoch.expire", "operator", epoch=1, after="member:bea",
                           through="member:cyd")  # fmt: skip
    assert rejected(book.submit(forged)[0], 403)
    assert book.state() == frozen
    assert next_step(book)  # cyd and dot
    assert next_step(book)  # eve, and the epoch is closed
    assert not next_step(book)
    info = book.epoch(1)
    assert (info.status, info.close_cursor) == ("closed", None)
    accounts = book.accounts()
    assert {h: accounts[f"member:{h}"][0] for h in handles} == {
        "ann": 0,  # 100 - 70 expired - 30 sent
        "bea": 80,  # 30 after its step, then +50
        "cyd": 30,  # 100 - 50 sent, then 20 of 50 expired
        "dot": 30,  # 100 + 30, then 130 - 100 expired
        "eve": 90,  # 100 - 60 held = 40 available: 10 expired
    }
    assert accounts["member:eve"][1] == 60
    assert accounts["system:expired"][0] == 70 + 70 + 20 + 100 + 10
    steps = step_ids(book)
    assert len(steps) == 3
    assert steps[0] == closed.id
    assert set(book.legs(steps[1])) == {f"{steps[1]}:0", f"{steps[1]}:1"}
    [(entry,)] = book.query("SELECT entry FROM journal_entries WHERE envelope_id = :id",
                            id=steps[2])  # fmt: skip
    assert json.loads(bytes(entry))["summary"] == {
        "epoch": 1,
        "asset": "CU",
        "members": 1,
        "total": 10,
        "closed": True,
        "held": {"member:eve": 60},
    }
    check_invariants(accounts)
    assert book.audit().findings == []
    assert verify_journal(from_database(book.url), book.vkey, engine="database").findings == []


def ledger_step(book: Ledger, *, after: str, through: str) -> Prechecked:
    """An ``epoch.expire`` step signed by the ledger, as the server's close task makes it."""
    payload = validate_payload(
        "epoch.expire",
        {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(utcnow()),
            "actor": "ledger",
            "epoch": 1,
            "after": after,
            "through": through,
        },
    )
    return sign_internal(book.ctx, payload, "epoch.expire")


def test_a_crash_in_the_middle_of_a_close_resumes_to_the_same_result(
    book: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(epochs, "STEP", 2)
    handles = ["ann", "bea", "cyd", "dot", "eve", "fay"]
    small_epoch(book, handles)
    book.accept(
        *[
            book.envelope(
                "deposit",
                "operator",
                to=f"member:{h}",
                asset="CU",
                amount=10 * i,
                external_ref=f"fund-{h}",
            )  # fmt: skip
            for i, h in enumerate(handles, 1)
        ]
    )
    book.accept(book.open_(1, {"basic": 100}, 25))
    book.accept(book.close_(1))
    before = book.state()
    real_move = epochs.bulk.move
    calls = 0

    def crashing_move(*args: Any, **kwargs: Any) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        real_move(*args, **kwargs)  # the rows are written, then the process dies
        raise RuntimeError("crash in the middle of a step")

    monkeypatch.setattr(epochs.bulk, "move", crashing_move)
    with pytest.raises(RuntimeError, match="crash"):
        next_step(book)
    assert calls == 1
    assert book.state() == before  # nothing of the step is left
    monkeypatch.setattr(epochs.bulk, "move", real_move)
    while next_step(book):
        pass
    accounts = book.accounts()
    # Exactly a whole close: each member keeps at most the cap of what it could spend.
    assert {h: accounts[f"member:{h}"][0] for h in handles} == dict.fromkeys(handles, 25)
    assert book.epoch(1).status == "closed"
    assert book.audit().findings == []


# --- 6. an open in steps ----------------------------------------------------------------
#
# With more members than ``epochs.CHUNK`` the open's entry only counts them (its summary);
# the server then fixes their allocations in steps by handle, each member as it was at
# the entry, and credits them. A member that changes (or registers) before its step is
# allocated by its state at the entry, so the result is the whole open's.


def background_round(book: Ledger) -> bool:
    """One round of the server's epoch task (``ubc.app._advance_once``)."""
    app = SimpleNamespace(
        state=SimpleNamespace(sessions=book.sessions, clock=SYSTEM_CLOCK, ctx=book.ctx)
    )
    return ubc.app._advance_once(app)  # type: ignore[arg-type]


@st.composite
def stepped_opens(draw: st.DrawFn) -> tuple[list[Member], int, list[list[tuple[str, str]]]]:
    count = draw(st.integers(1, 9))
    members = [
        Member(
            f"m{draw(st.sampled_from(['', '-', '_']))}{i:02d}",
            draw(st.sampled_from(["active", "active", "suspended", "pending"])),
            draw(st.sampled_from(["basic", "pro", "guest"])),
            0,
        )
        for i in range(count)
    ]
    chunk = draw(st.integers(1, 3))
    handles = [m.handle for m in members] + ["aa1", "m-99", "zz1"]
    change = st.tuples(
        st.sampled_from(handles),
        st.sampled_from(["suspended", "active:basic", "active:pro", "active:guest", "new"]),
    )
    rounds = [draw(st.lists(change, max_size=3)) for _ in range(count // chunk + 2)]
    return members, chunk, rounds


@given(case=stepped_opens())
@settings(max_examples=10, deadline=None)
def test_an_open_in_steps_allocates_by_the_state_at_its_entry(
    case: tuple[list[Member], int, list[list[tuple[str, str]]]], db_url: str, tmp_path: Path
) -> None:
    members, chunk, rounds = case
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        make_data_dir(data_dir)
    empty(db_url)
    book = Ledger(db_url, data_dir)
    try:
        with unittest.mock.patch.object(epochs, "CHUNK", chunk):
            _run_stepped_open(book, members, rounds)
    finally:
        book.close()


def _run_stepped_open(
    book: Ledger, members: list[Member], rounds: list[list[tuple[str, str]]]
) -> None:
    allocations = {"basic": 100, "pro": 250}
    book.accept(*[book.register(m.handle) for m in members])
    book.accept(
        *[
            book.envelope("member.admit", "operator", handle=m.handle, tier=m.tier)
            for m in members
            if m.status != "pending"
        ]
    )
    book.accept(
        *[
            book.envelope("member.update", "operator", handle=m.handle, status="suspended")
            for m in members
            if m.status == "suspended"
        ]
    )
    # What a whole open at the entry allocates.
    eligible = sorted(m.handle for m in members if m.status == "active" and m.tier != "guest")
    tier_of = {m.handle: m.tier for m in members}
    [opened] = book.accept(book.open_(1, allocations, None))
    assert opened.summary is not None
    assert opened.summary["members"] == len(eligible)
    status = {m.handle: m.status for m in members}
    for changes in rounds:
        # Members change between steps: their allocation stays what the entry saw.
        for handle, what in changes:
            if what == "new" or handle not in status:
                if handle not in status:
                    book.accept(book.register(handle))
                    status[handle] = "pending"
                continue
            if what == "suspended":
                if status[handle] == "active":
                    book.accept(
                        book.envelope("member.update", "operator", handle=handle, status=what)
                    )
                    status[handle] = what
                continue
            tier = what.split(":")[1]
            if status[handle] == "pending":
                book.accept(book.envelope("member.admit", "operator", handle=handle, tier=tier))
            else:
                book.accept(
                    book.envelope(
                        "member.update", "operator", handle=handle, status="active", tier=tier
                    )
                )
            status[handle] = "active"
        if not background_round(book):
            break
    while background_round(book):
        pass
    info = book.epoch(1)
    assert (info.status, info.members, info.applied) == ("open", len(eligible), len(eligible))
    assert book.legs(opened.id) == {
        f"{opened.id}:{leg}": (
            "system:issuance",
            f"member:{h}",
            allocations[tier_of[h]],
            "allocation",
            "posted",
        )
        for leg, h in enumerate(eligible)
    }
    assert book.query("SELECT count(*) FROM epoch_fixes") == [(0,)]
    check_invariants(book.accounts())
    assert book.audit().findings == []


def test_an_open_in_steps_lets_the_ledger_run_meanwhile(
    book: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(epochs, "CHUNK", 2)
    small_epoch(book, ["ann", "bea", "cyd", "dot", "eve"])
    [opened] = book.accept(book.open_(1, {"basic": 100}, 20))
    info = book.epoch(1)
    assert (info.status, info.members, info.applied) == ("opening", 5, 0)
    # Before its allocation is fixed: eve is suspended, then a newcomer registers and is
    # admitted; eve still gets hers, the newcomer none (it was no member at the entry).
    book.accept(book.envelope("member.update", "operator", handle="eve", status="suspended"))
    book.accept(book.register("fin"))
    book.accept(book.envelope("member.admit", "operator", handle="fin", tier="basic"))
    assert background_round(book)  # ann, bea
    book.accept(book.send("ann", "bea", 40))  # credited members spend at once
    while background_round(book):
        pass
    accounts = book.accounts()
    assert {h: accounts[f"member:{h}"][0] for h in ["ann", "bea", "cyd", "dot", "eve", "fin"]} == {
        "ann": 60,
        "bea": 140,
        "cyd": 100,
        "dot": 100,
        "eve": 100,
        "fin": 0,
    }
    assert len(book.legs(opened.id)) == 5
    assert book.audit().findings == []
    assert verify_journal(from_database(book.url), book.vkey, engine="database").findings == []


def test_a_served_close_runs_its_steps_in_the_background_while_members_send(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP: the close answers at once with its first step; the server journals the
    others by itself; members' transfers are accepted meanwhile; the auditor agrees."""
    monkeypatch.setattr(epochs, "STEP", 2)
    tiers: dict[str, str | None] = {f"u{i:02d}": "basic" for i in range(7)}
    with (
        run_server(db_url, make_data_dir(tmp_path / "data")) as server,
        served(server, tiers) as http,
    ):
        op, members = http.op, http.members
        op.submit(http.open_({"basic": 100}, 40))
        http.wait(1, lambda i: i["status"] == "open")
        closed: dict[str, Any] = dict(op.submit(op.envelope("epoch.close", epoch=1)))
        assert closed["summary"]["through"] == "member:u01"
        sent = 0
        for sender in ("u06", "u05", "u04"):  # while the steps run: accepted
            members[sender].send("u00", 10)
            sent += 10
        info = http.wait(1, lambda i: i["status"] == "closed")
        assert info["close_cursor"] is None
        posted = http.posted()
        # u00's step was the first: it keeps every transfer it got after it.
        assert posted["member:u00"] == 40 + sent
        for h in ("u01", "u02", "u03"):
            assert posted[f"member:{h}"] == 40
        assert info["expired"] == posted["system:expired"]
        assert http.audit().findings == []
