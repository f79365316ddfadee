"""The compute market: backed offers, exact fills, cancel, expiry, the epoch-close rule of
escrowed compute, batches, bad input that changes nothing, the auditor, HTTP and the CLI.

Rule-level tests drive the write path in-process (``ubc.envelopes.service.submit``) on one
database per engine, emptied for each test; the client, the CLI and the race run over a
real server.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from nacl.signing import SigningKey
from sqlalchemy import text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

import ubc.models
from tests.conftest import POSTGRES_URL, LiveServer, _admin_conninfo, make_data_dir, run_server
from ubc.app import sweep_once
from ubc.audit.source import from_database, from_export, write_export
from ubc.audit.verify import Report, compare_with_database, verify_journal
from ubc.cli import app as cli
from ubc.client import UbcApiError, UbcClient
from ubc.clock import ManualClock
from ubc.config import Settings
from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.dbtypes import utcnow
from ubc.envelopes import service as envelopes
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.errors import UbcError
from ubc.journal.checkpoint import format_checkpoint
from ubc.journal.merkle import append_leaves, leaf_hash, root_from_frontier
from ubc.market import service as market
from ubc.market.rules import fill_payment
from ubc.migrations import upgrade
from ubc.runtime import load_runtime
from ubc.signing import (
    NoteSigner,
    canonical_json,
    encode_public_key,
    generate_signing_key,
    load_signing_key,
)
from ubc.signing.dsse import Envelope, add_signature

ORIGIN = "test.ubc/ledger"
STARTS, ENDS = "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"


# --- one database per engine and module, emptied for each test ---------------------------


def empty(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for table in reversed(ubc.models.metadata.sorted_tables):
                connection.execute(text(f"DELETE FROM {table.name}"))
    finally:
        engine.dispose()


def module_database(name: str) -> Callable[..., Iterator[str]]:
    """A module-scoped fixture: a migrated database of each engine for one test module."""

    @pytest.fixture(
        scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
    )
    def module_db(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[str]:
        if request.param == "sqlite":
            template: Path = request.getfixturevalue("sqlite_template")
            path = tmp_path_factory.mktemp(name) / "ubc.db"
            shutil.copyfile(template, path)
            yield f"sqlite:///{path}"
            return
        template_name: str = request.getfixturevalue("postgres_template")
        db = f"ubc_{name}_{os.getpid()}"
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db}" TEMPLATE "{template_name}"')
        yield make_url(POSTGRES_URL).set(database=db).render_as_string(hide_password=False)
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    return module_db


module_db = module_database("market")


@pytest.fixture
def book(module_db: str, tmp_path: Path) -> Iterator[Book]:
    empty(module_db)
    made = Book(module_db, make_data_dir(tmp_path / "data"), market_fee_bps=100)
    yield made
    made.close()


# --- an in-process ledger ----------------------------------------------------------------


class Book:
    """A ledger driven through the write path in-process, with market helpers."""

    def __init__(self, url: str, data_dir: Path, *, market_fee_bps: int = 0) -> None:
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
        self.refs = 0
        if market_fee_bps:
            self.set_fee(market_fee_bps)

    def close(self) -> None:
        self.engine.dispose()

    # writing

    def envelope(
        self, type_: str, signer: str, *, created_at: datetime | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Signed by ``operator``, ``ledger`` or a member handle; ``from_`` means ``from``."""
        if "from_" in fields:
            fields["from"] = fields.pop("from_")
        if signer == "operator":
            keys, actor = [self.operator], "operator"
        elif signer == "ledger":
            keys, actor = [self.ledger_key], "ledger"
        else:
            keys, actor = [self.keys[signer]], f"member:{signer}"
        body = {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(created_at or utcnow()),
            "actor": actor,
            **fields,
        }
        payload = validate_payload(type_, body)
        return envelopes.sign_payload(payload, type_, keys).to_json()

    def submit(
        self,
        *items: dict[str, Any],
        now: datetime | None = None,
        internal: bool = False,
        atomic: bool = False,
    ) -> list[envelopes.Outcome]:
        with unit_of_work(self.sessions) as session:
            return envelopes.submit(
                session, self.ctx, list(items), now=now, internal=internal, atomic=atomic
            )

    def accept(self, *items: dict[str, Any], **kwargs: Any) -> list[envelopes.Receipt]:
        receipts = []
        for outcome in self.submit(*items, **kwargs):
            assert isinstance(outcome, envelopes.Accepted), outcome
            receipts.append(outcome.receipt)
        return receipts

    def one(self, item: dict[str, Any], **kwargs: Any) -> envelopes.Receipt:
        return self.accept(item, **kwargs)[0]

    def refused(
        self,
        item: dict[str, Any],
        status: int,
        type_: str | None = None,
        *,
        now: datetime | None = None,
    ) -> UbcError:
        """``item`` is refused with ``status`` (at ``now``) and changes nothing at all."""
        before = self.state()
        [outcome] = self.submit(item, now=now)
        assert isinstance(outcome, UbcError), outcome
        assert outcome.status_code == status, outcome.to_body()
        if type_ is not None:
            assert outcome.error_type == type_, outcome.to_body()
        assert self.state() == before
        return outcome

    def set_fee(self, bps: int) -> None:
        config = dict(self.config())
        config.update(id=str(uuid.uuid4()), created_at=format_timestamp(utcnow()))
        config["market_fee_bps"] = bps
        payload = validate_payload("ledger.config", config)
        envelope = envelopes.sign_payload(
            payload, "ledger.config", [self.ledger_key, self.operator]
        )
        self.accept(envelope.to_json(), internal=True)

    def config(self) -> dict[str, Any]:
        [(body,)] = self.query("SELECT body FROM ledger_config ORDER BY id DESC LIMIT 1")
        config: dict[str, Any] = json.loads(body)
        return config

    def member(self, handle: str, *, cu: int = 0, usd: int = 0, tier: str = "basic") -> str:
        key = self.keys[handle] = generate_signing_key()
        items = [
            self.envelope(
                "member.register",
                handle,
                handle=handle,
                public_key=encode_public_key(bytes(key.verify_key)),
            ),
            self.envelope("member.admit", "operator", handle=handle, tier=tier),
        ]
        for asset, amount in (("CU", cu), ("USD", usd)):
            if amount:
                self.refs += 1
                items.append(
                    self.envelope(
                        "deposit",
                        "operator",
                        to=f"member:{handle}",
                        asset=asset,
                        amount=amount,
                        external_ref=f"ref-{self.refs}-{uuid.uuid4()}",
                    )
                )
        self.accept(*items)
        return f"member:{handle}"

    def offer(
        self,
        seller: str,
        amount: int,
        price: int,
        *,
        sell: str = "CU",
        pay: str = "USD",
        expires_at: datetime | None = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "sell_asset": sell,
            "sell_amount": amount,
            "price_asset": pay,
            "price_amount": price,
        }
        if expires_at is not None:
            fields["expires_at"] = format_timestamp(expires_at)
        return self.envelope("offer.create", seller, **fields)

    def fill(self, buyer: str, offer_id: str, amount: int) -> dict[str, Any]:
        return self.envelope("offer.fill", buyer, offer_id=offer_id, amount=amount)

    def cancel(self, seller: str, offer_id: str) -> dict[str, Any]:
        return self.envelope("offer.cancel", seller, offer_id=offer_id)

    def expire(self, offer_id: str, now: datetime) -> dict[str, Any]:
        return self.envelope("offer.expire", "ledger", created_at=now, offer_id=offer_id)

    def open_epoch(self, epoch: int, allocations: dict[str, int], cap: int | None) -> None:
        self.one(
            self.envelope(
                "epoch.open",
                "operator",
                epoch=epoch,
                asset="CU",
                allocations=allocations,
                carryover_cap=cap,
                starts_at=STARTS,
                ends_at=ENDS,
            )
        )

    def close_epoch(self, epoch: int) -> None:
        self.one(self.envelope("epoch.close", "operator", epoch=epoch))

    # reading

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.sessions() as session:
            return [tuple(r) for r in session.execute(text(sql), params)]

    def balances(self) -> dict[tuple[str, str], int]:
        """(address, asset) → available."""
        return {
            (str(r[0]), str(r[1])): int(r[2])
            for r in self.query(
                "SELECT address, asset, credits_posted - debits_posted - debits_pending "
                "FROM accounts"
            )
        }

    def available(self, address: str, asset: str = "CU") -> int:
        return self.balances()[(address, asset)]

    def offer_row(self, offer_id: str) -> dict[str, Any]:
        rows = self.query(
            "SELECT status, remaining_amount, remaining_price FROM offers WHERE id = :id",
            id=offer_id,
        )
        [(status, amount, price)] = rows
        return {"status": status, "remaining_amount": amount, "remaining_price": price}

    def state(self) -> tuple[Any, ...]:
        """What a refused envelope must leave as it was."""
        return (
            sorted(self.balances().items()),
            self.query("SELECT size FROM journal_head"),
            self.query("SELECT count(*) FROM transfers"),
            self.query("SELECT * FROM offers ORDER BY id"),
            self.query("SELECT * FROM offer_fills ORDER BY id"),
            self.query("SELECT * FROM causes ORDER BY slug"),
            self.query("SELECT * FROM cause_stewards ORDER BY slug, handle"),
            self.query("SELECT key_hash, account FROM api_keys ORDER BY key_hash"),
        )

    def audit(self) -> Report:
        live = self.url
        return verify_journal(
            from_database(live),
            self.vkey,
            against=lambda url: compare_with_database(url, live),
        )

    def check_invariants(self) -> None:
        """Double entry per asset, nobody below zero, escrow = the open offers' remainders."""
        rows = self.query(
            "SELECT address, asset, credits_posted - debits_posted, "
            "credits_pending - debits_pending, non_negative, "
            "credits_posted - debits_posted - debits_pending FROM accounts"
        )
        for asset in {r[1] for r in rows}:
            assert sum(int(r[2]) for r in rows if r[1] == asset) == 0
            assert sum(int(r[3]) for r in rows if r[1] == asset) == 0
        for r in rows:
            if r[4]:
                assert int(r[5]) >= 0, r
        escrow = {str(r[1]): int(r[2]) for r in rows if r[0] == "market:escrow"}
        offered = {
            str(a): int(n)
            for a, n in self.query(
                "SELECT sell_asset, sum(remaining_amount) FROM offers WHERE status = 'open' "
                "GROUP BY sell_asset"
            )
        }
        for asset, balance in escrow.items():
            assert balance == offered.get(asset, 0), (asset, balance, offered)


def effects(receipt: envelopes.Receipt) -> list[tuple[str, str, str, int, str]]:
    return [(e["debit"], e["credit"], e["asset"], e["amount"], e["kind"]) for e in receipt.effects]


# --- pricing ------------------------------------------------------------------------------


def test_fill_payment_is_the_ceiling_of_the_proportional_price() -> None:
    assert fill_payment(3, 10, 1) == 4  # ceil(10/3)
    assert fill_payment(2, 6, 1) == 3
    assert fill_payment(1, 3, 1) == 3  # the last fill pays what is left
    assert fill_payment(10, 1, 1) == 1
    assert fill_payment(9, 0, 9) == 0
    with pytest.raises(ValueError, match="between 1 and"):
        fill_payment(3, 10, 4)


# --- the life of an offer ----------------------------------------------------------------


def test_an_offer_is_backed_filled_exactly_and_pays_its_whole_price(book: Book) -> None:
    alice = book.member("alice", cu=100)
    bob = book.member("bob", usd=10_000)
    created = book.one(book.offer("alice", 30, 1000))
    offer_id = created.id
    assert effects(created) == [(alice, "market:escrow", "CU", 30, "trade")]
    assert book.available(alice) == 70
    assert book.available("market:escrow") == 30

    first = book.one(book.fill("bob", offer_id, 7))
    # ceil(1000 × 7 / 30) = 234; fee floor(234 × 100 / 10000) = 2, paid by the seller
    assert effects(first) == [
        (bob, alice, "USD", 232, "trade"),
        (bob, "system:fees", "USD", 2, "fee"),
        ("market:escrow", bob, "CU", 7, "trade"),
    ]
    assert [e["transfer_id"] for e in first.effects] == [f"{first.id}:{i}" for i in range(3)]
    assert book.offer_row(offer_id) == {
        "status": "open",
        "remaining_amount": 23,
        "remaining_price": 766,
    }
    second = book.one(book.fill("bob", offer_id, 10))  # ceil(766 × 10 / 23) = 334
    assert effects(second)[0][3] + effects(second)[1][3] == 334
    last = book.one(book.fill("bob", offer_id, 13))
    assert sum(e["amount"] for e in last.effects if e["asset"] == "USD") == 766 - 334
    assert book.offer_row(offer_id)["status"] == "filled"
    paid = 10_000 - book.available(bob, "USD")
    assert paid == 1000  # exactly the price, whatever the rounding of each fill
    assert book.available(alice, "USD") + book.available("system:fees", "USD") == 1000
    assert book.available(bob) == 30
    assert book.available("market:escrow") == 0
    book.refused(book.fill("bob", offer_id, 1), 409, "state_conflict")
    book.check_invariants()
    assert book.audit().findings == []


def test_a_fill_pays_nothing_once_the_whole_price_is_paid(book: Book) -> None:
    book.set_fee(0)
    book.member("alice", cu=10)
    bob = book.member("bob", usd=5)
    offer_id = book.one(book.offer("alice", 10, 1)).id
    assert effects(book.one(book.fill("bob", offer_id, 1)))[0][3] == 1
    # The seller already has its whole price: what is left goes for nothing, no 0 legs.
    free = book.one(book.fill("bob", offer_id, 9))
    assert effects(free) == [("market:escrow", bob, "CU", 9, "trade")]
    assert book.available(bob, "USD") == 4
    book.check_invariants()


def test_a_fee_of_the_whole_payment_leaves_no_zero_leg(book: Book) -> None:
    book.set_fee(10_000)
    book.member("alice", cu=10)
    bob = book.member("bob", usd=50)
    offer_id = book.one(book.offer("alice", 10, 50)).id
    receipt = book.one(book.fill("bob", offer_id, 10))
    assert effects(receipt) == [
        (bob, "system:fees", "USD", 50, "fee"),
        ("market:escrow", bob, "CU", 10, "trade"),
    ]


def test_cancel_returns_what_is_left_to_the_seller_only(book: Book) -> None:
    alice = book.member("alice", cu=100)
    book.member("bob", usd=1000)
    offer_id = book.one(book.offer("alice", 40, 400)).id
    book.one(book.fill("bob", offer_id, 15))
    book.refused(book.cancel("bob", offer_id), 403, "forbidden")
    receipt = book.one(book.cancel("alice", offer_id))
    assert effects(receipt) == [("market:escrow", alice, "CU", 25, "trade")]
    assert book.available(alice) == 85
    assert book.offer_row(offer_id)["status"] == "cancelled"
    book.refused(book.cancel("alice", offer_id), 409, "state_conflict")
    book.refused(book.fill("bob", offer_id, 1), 409, "state_conflict")
    book.check_invariants()
    assert book.audit().findings == []


def test_expiry_returns_what_is_left_after_expires_at(book: Book) -> None:
    alice = book.member("alice", cu=100)
    book.member("bob", usd=1000)
    now = utcnow()
    offer_id = book.one(book.offer("alice", 20, 200, expires_at=now + timedelta(seconds=30))).id
    book.one(book.fill("bob", offer_id, 5))
    # Too early: the ledger's own envelope is refused, and nothing is due.
    [early] = book.submit(book.expire(offer_id, now), now=now, internal=True)
    assert isinstance(early, UbcError)
    assert early.status_code == 409
    with unit_of_work(book.sessions) as session:
        assert (
            market.expire_due_offers(session, book.ctx, submit=envelopes.submit, now=utcnow()) == 0
        )
    # A member cannot write the ledger's envelope type.
    book.refused(book.envelope("offer.expire", "alice", offer_id=offer_id), 403)
    later = now + timedelta(seconds=31)
    # A fill after expires_at is refused even before the sweeper ran.
    [late] = book.submit(book.fill("bob", offer_id, 1), now=later)
    assert isinstance(late, UbcError)
    assert late.status_code == 409
    assert "expired" in late.message
    with unit_of_work(book.sessions) as session:
        assert market.expire_due_offers(session, book.ctx, submit=envelopes.submit, now=later) == 1
    assert book.offer_row(offer_id)["status"] == "expired"
    assert book.available(alice) == 95
    with unit_of_work(book.sessions) as session:
        assert market.expire_due_offers(session, book.ctx, submit=envelopes.submit, now=later) == 0
    book.check_invariants()
    assert book.audit().findings == []


# --- bad input changes nothing ------------------------------------------------------------


def test_bad_fills_are_refused_and_change_nothing(book: Book) -> None:
    book.member("alice", cu=100, usd=100)
    book.member("bob", usd=100)
    book.member("carol", cu=10)
    book.member("dave", usd=1000, tier="basic")
    offer_id = book.one(book.offer("alice", 10, 100)).id
    cancelled = book.one(book.offer("alice", 10, 100)).id
    book.one(book.cancel("alice", cancelled))
    soon = utcnow() + timedelta(milliseconds=300)
    expiring = book.one(book.offer("alice", 5, 10, expires_at=soon)).id

    book.refused(book.fill("bob", str(uuid.uuid4()), 1), 404, "not_found")
    book.refused(book.fill("alice", offer_id, 1), 403, "forbidden")  # own offer
    book.refused(book.fill("bob", cancelled, 1), 409, "state_conflict")
    book.refused(book.fill("bob", offer_id, 11), 409, "state_conflict")  # more than left
    # bob has 100 USD; 10 units cost 100 — but carol has no USD at all
    book.refused(book.fill("carol", offer_id, 1), 409, "insufficient_funds")
    book.one(book.envelope("member.update", "operator", handle="dave", status="suspended"))
    book.refused(book.fill("dave", offer_id, 1), 403, "forbidden")

    # Just past its expiry, on the ledger's time.
    after = soon + timedelta(milliseconds=10)
    book.refused(book.fill("bob", expiring, 1), 409, "state_conflict", now=after)
    book.check_invariants()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sell_amount", 0),
        ("sell_amount", -5),
        ("sell_amount", 2**53),
        ("price_amount", 0),
        ("price_amount", -1),
        ("price_amount", 2**63),
        ("sell_amount", "10"),
        ("price_amount", 1.5),
    ],
)
def test_bad_amounts_are_refused_before_anything(book: Book, field: str, value: Any) -> None:
    book.member("alice", cu=100)
    good = book.offer("alice", 10, 100)
    body = json.loads(base64.b64decode(good["payload"]))
    body[field] = value
    from ubc.signing import payload_type_for, sign_envelope

    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    envelope = sign_envelope(payload_type_for("offer.create"), raw, [book.keys["alice"]])
    book.refused(envelope.to_json(), 400)


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"price_asset": "CU"}, 400),  # the same asset on both sides
        ({"sell_asset": "EUR"}, 400),  # not an asset of this ledger
        ({"sell_amount": 101}, 409),  # more than alice has
    ],
)
def test_bad_offers_are_refused_and_change_nothing(
    book: Book, change: dict[str, Any], status: int
) -> None:
    book.member("alice", cu=100)
    fields = {"sell_asset": "CU", "sell_amount": 10, "price_asset": "USD", "price_amount": 5}
    book.refused(book.envelope("offer.create", "alice", **{**fields, **change}), status)


def test_an_offer_that_expires_in_the_past_is_refused(book: Book) -> None:
    book.member("alice", cu=100)
    book.refused(book.offer("alice", 10, 5, expires_at=utcnow() - timedelta(seconds=1)), 400)
    book.refused(book.fill("alice", str(uuid.uuid4()), 1), 404)


def test_fill_amounts_zero_negative_or_too_large_are_refused(book: Book) -> None:
    book.member("alice", cu=100)
    book.member("bob", usd=100)
    offer_id = book.one(book.offer("alice", 10, 100)).id
    good = book.fill("bob", offer_id, 1)
    from ubc.signing import payload_type_for, sign_envelope

    for value in (0, -1, 2**53):
        body = json.loads(base64.b64decode(good["payload"]))
        body["amount"] = value
        body["id"] = str(uuid.uuid4())
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        envelope = sign_envelope(payload_type_for("offer.fill"), raw, [book.keys["bob"]])
        book.refused(envelope.to_json(), 400)


# --- batches --------------------------------------------------------------------------------


def test_create_and_fills_of_one_offer_in_one_batch(book: Book) -> None:
    book.member("alice", cu=100)
    bob = book.member("bob", usd=1000)
    carol = book.member("carol", usd=1000)
    create = book.offer("alice", 10, 100)
    offer_id = json.loads(base64.b64decode(create["payload"]))["id"]
    receipts = book.accept(
        create,
        book.fill("bob", offer_id, 3),
        book.fill("carol", offer_id, 3),
        book.fill("bob", offer_id, 4),
        atomic=True,
    )
    paid = [sum(e["amount"] for e in r.effects if e["asset"] == "USD") for r in receipts[1:]]
    assert paid == [30, 30, 40]
    assert book.offer_row(offer_id)["status"] == "filled"
    assert book.available(bob) == 7
    assert book.available(carol) == 3
    # More than is left, in the same batch as the fill that empties it
    again = book.one(book.offer("alice", 5, 50))
    outcomes = book.submit(book.fill("bob", again.id, 5), book.fill("carol", again.id, 1))
    assert isinstance(outcomes[0], envelopes.Accepted)
    assert isinstance(outcomes[1], UbcError)
    assert outcomes[1].status_code == 409
    book.check_invariants()
    assert book.audit().findings == []


def test_a_failed_fill_in_a_batch_does_not_skew_the_next_one(book: Book) -> None:
    book.member("alice", cu=100)
    book.member("bob", usd=1000)
    book.member("poor", usd=1)
    offer_id = book.one(book.offer("alice", 10, 100)).id
    outcomes = book.submit(
        book.fill("poor", offer_id, 5),  # cannot pay 50
        book.fill("bob", offer_id, 2),  # planned as if the first had applied
        book.fill("bob", offer_id, 3),
    )
    assert isinstance(outcomes[0], UbcError)
    assert outcomes[0].error_type == "insufficient_funds"
    # The next fills are planned on the offer as the failed one left it: untouched.
    assert isinstance(outcomes[1], envelopes.Accepted)
    assert sum(e["amount"] for e in outcomes[1].receipt.effects if e["asset"] == "USD") == 20
    assert isinstance(outcomes[2], envelopes.Accepted)
    assert sum(e["amount"] for e in outcomes[2].receipt.effects if e["asset"] == "USD") == 30
    assert book.offer_row(offer_id) == {
        "status": "open",
        "remaining_amount": 5,
        "remaining_price": 50,
    }
    book.check_invariants()
    assert book.audit().findings == []


def test_cancel_and_fill_of_one_offer_in_one_batch(book: Book) -> None:
    alice = book.member("alice", cu=100)
    book.member("bob", usd=1000)
    offer_id = book.one(book.offer("alice", 10, 100)).id
    outcomes = book.submit(
        book.fill("bob", offer_id, 4), book.cancel("alice", offer_id), book.fill("bob", offer_id, 1)
    )
    assert isinstance(outcomes[0], envelopes.Accepted)
    assert isinstance(outcomes[1], envelopes.Accepted)
    assert effects(outcomes[1].receipt) == [("market:escrow", alice, "CU", 6, "trade")]
    assert isinstance(outcomes[2], UbcError)
    assert outcomes[2].status_code == 409
    book.check_invariants()


# --- the epoch-close rule of escrowed compute ------------------------------------------------


def test_escrow_is_not_expired_at_close_and_its_rest_comes_back_capped(book: Book) -> None:
    """Compute on offer across a close comes back as if it had stayed in the account."""
    book.set_fee(0)
    hoarder = book.member("hoarder")
    modest = book.member("modest")
    free = book.member("free")
    buyer = book.member("buyer", usd=1000)
    book.open_epoch(1, {"basic": 100}, cap=20)
    hoarded = book.one(book.offer("hoarder", 80, 10**6)).id  # priced so nobody buys
    modest_offer = book.one(book.offer("modest", 95, 10**6)).id
    sold = book.one(book.offer("free", 50, 50)).id
    book.close_epoch(1)
    # Members' accounts were capped; the escrow was not touched.
    assert book.available(hoarder) == 20
    assert book.available(modest) == 5
    assert book.available("market:escrow") == 80 + 95 + 50
    # Offers stay open across the close: a buyer can still buy.
    book.one(book.fill("buyer", sold, 10))
    assert book.available(buyer) == 20 + 10  # its own allocation, capped, and 10 bought
    # hoarder had 20 after the close: at the cap, so nothing of its 80 comes back.
    back = book.one(book.cancel("hoarder", hoarded))
    assert effects(back) == [("market:escrow", "system:expired", "CU", 80, "expiry")]
    # modest had 5: it keeps 15 of its 95, up to the cap, as if they had stayed.
    back = book.one(book.cancel("modest", modest_offer))
    assert effects(back) == [
        ("market:escrow", modest, "CU", 15, "trade"),
        ("market:escrow", "system:expired", "CU", 80, "expiry"),
    ]
    assert book.available(modest) == 20
    # An offer made after the close comes back whole.
    later = book.one(book.offer("free", 10, 10)).id
    assert effects(book.one(book.cancel("free", later))) == [
        ("market:escrow", free, "CU", 10, "trade")
    ]
    book.check_invariants()
    assert book.audit().findings == []


def test_without_a_cap_escrowed_compute_comes_back_whole(book: Book) -> None:
    alice = book.member("alice")
    book.open_epoch(1, {"basic": 100}, cap=None)
    offer_id = book.one(book.offer("alice", 60, 600)).id
    book.close_epoch(1)
    assert effects(book.one(book.cancel("alice", offer_id))) == [
        ("market:escrow", alice, "CU", 60, "trade")
    ]


def test_expiry_after_two_capped_closes_applies_each_cap(book: Book) -> None:
    alice = book.member("alice")
    book.open_epoch(1, {"basic": 100}, cap=50)
    now = utcnow()
    offer_id = book.one(book.offer("alice", 70, 10**6, expires_at=now + timedelta(hours=1))).id
    book.close_epoch(1)  # alice 30 ≤ 50: as if 100 → keeps 20 of the 70
    book.open_epoch(2, {"basic": 10}, cap=35)
    book.close_epoch(2)  # alice 40 → 35: as if 60 → 35, nothing of the offer
    assert book.available(alice) == 35
    later = now + timedelta(hours=2)
    receipt = book.one(book.expire(offer_id, later), now=later, internal=True)
    assert effects(receipt) == [("market:escrow", "system:expired", "CU", 70, "expiry")]
    book.check_invariants()
    assert book.audit().findings == []


# --- the order book ----------------------------------------------------------------------


def test_offers_are_listed_best_unit_price_first(book: Book) -> None:
    book.member("alice", cu=1000)
    book.member("bob", cu=1000)
    ids = {
        "3/1": book.one(book.offer("alice", 1, 3)).id,
        "5/2": book.one(book.offer("bob", 2, 5)).id,
        "7/3": book.one(book.offer("alice", 3, 7)).id,
        "1/1": book.one(book.offer("bob", 1, 1)).id,
        "10/4": book.one(book.offer("alice", 4, 10)).id,  # = 5/2, made later
    }
    cancelled = book.one(book.offer("bob", 1, 1)).id
    book.one(book.cancel("bob", cancelled))
    with book.sessions() as session:
        listed = [o.id for o in market.open_offers(session, now=utcnow(), sell_asset="CU")]
    assert listed == [ids["1/1"], ids["7/3"], ids["5/2"], ids["10/4"], ids["3/1"]]


# --- the auditor ------------------------------------------------------------------------------


def export(book: Book, path: Path) -> tuple[dict[str, Any], list[bytes]]:
    with path.open("w", encoding="utf-8") as out:
        write_export(from_database(book.url), out, origin=ORIGIN)
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]), [base64.b64decode(json.loads(x)["entry"]) for x in lines[1:]]


def resigned(book: Book, path: Path, header: dict[str, Any], entries: list[bytes]) -> Path:
    frontier: list[bytes] = []
    for position, entry in enumerate(entries):
        frontier = append_leaves(position, frontier, [leaf_hash(entry)])[1]
    size = len(entries)
    note = format_checkpoint(ORIGIN, size, root_from_frontier(size, frontier))
    header = {**header, "size": size, "checkpoint": NoteSigner(ORIGIN, book.ledger_key).sign(note)}
    lines = [json.dumps(header)] + [
        json.dumps({"seq": seq, "entry": base64.b64encode(entry).decode()})
        for seq, entry in enumerate(entries)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_auditor_catches_a_fill_that_moved_value_without_payment(
    book: Book, tmp_path: Path
) -> None:
    book.member("alice", cu=100)
    book.member("bob", usd=1000)
    offer_id = book.one(book.offer("alice", 10, 100)).id
    fill = book.one(book.fill("bob", offer_id, 4))
    header, entries = export(book, tmp_path / "export.jsonl")
    clean = resigned(book, tmp_path / "clean.jsonl", header, entries)
    assert verify_journal(from_export(clean), book.vkey).findings == []

    body = json.loads(entries[fill.seq])
    # The ledger's key signs a history where bob got the units and paid nothing.
    body["effects"] = [e for e in body["effects"] if e["asset"] == "CU"]
    body["effects"][0]["transfer_id"] = f"{fill.id}:0"
    entries[fill.seq] = canonical_json(body)
    forged = resigned(book, tmp_path / "forged.jsonl", header, entries)
    report = verify_journal(from_export(forged), book.vkey)
    assert {(f.seq, f.rule) for f in report.findings} == {(fill.seq, "effects.offer.fill")}


def test_the_auditor_catches_a_fill_paid_less_than_the_rule(book: Book, tmp_path: Path) -> None:
    book.member("alice", cu=100)
    book.member("bob", usd=1000)
    offer_id = book.one(book.offer("alice", 10, 100)).id
    fill = book.one(book.fill("bob", offer_id, 4))
    header, entries = export(book, tmp_path / "export.jsonl")
    body = json.loads(entries[fill.seq])
    body["effects"][0]["amount"] -= 1
    entries[fill.seq] = canonical_json(body)
    report = verify_journal(
        from_export(resigned(book, tmp_path / "f.jsonl", header, entries)), book.vkey
    )
    assert (fill.seq, "effects.offer.fill") in {(f.seq, f.rule) for f in report.findings}


# --- over HTTP: the client, the race, the CLI ----------------------------------------------

_clients: list[UbcClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def client(server: LiveServer, **kwargs: Any) -> UbcClient:
    made = UbcClient(server.url, **kwargs)
    _clients.append(made)
    return made


def people(
    server: LiveServer, *handles: str, cu: int = 0, usd: int = 0, read: bool = True
) -> dict[str, UbcClient]:
    operator = client(server, key=server.operator_key, token=server.operator_token)
    found = {"operator": operator}
    for handle in handles:
        member = client(server, key=generate_signing_key(), handle=handle)
        member.register()
        operator.admit(handle, "basic")
        for asset, amount in (("CU", cu), ("USD", usd)):
            if amount:
                operator.deposit(handle, amount, asset, external_ref=f"{handle}-{asset}")
        if read:
            member.token, _ = member.grant_api_key("read", scopes=["read"])
        found[handle] = member
    return found


def test_the_market_over_http(live_server: LiveServer) -> None:
    p = people(live_server, "alice", "bob", "carol", cu=100, usd=5000)
    alice, bob, carol, operator = p["alice"], p["bob"], p["carol"], p["operator"]
    cheap = alice.sell(10, 100)["id"]
    dear = carol.sell(10, 150, expires_at=utcnow() + timedelta(hours=1))["id"]
    listed = bob.offers(sell_asset="CU", price_asset="USD")
    assert [o["id"] for o in listed] == [cheap, dear]
    assert listed[1]["expires_at"] is not None
    receipt = bob.buy(cheap, 4)
    assert receipt["type"] == "offer.fill"
    bob.buy(cheap)  # the rest
    assert alice.offer(cheap)["status"] == "filled"
    assert alice.offer(cheap)["sold"] == 10
    bought, cursor = bob.trades()
    assert [t["side"] for t in bought] == ["buy", "buy"]
    assert cursor is None
    assert sum(t["payment"] for t in bought) == 100
    sold, _ = alice.trades()
    assert {t["side"] for t in sold} == {"sell"}
    everything, _ = operator.trades("*")
    assert len(everything) == 2
    with pytest.raises(UbcApiError) as info:
        bob.trades("alice")  # another member's trades
    assert info.value.status == 403
    with pytest.raises(UbcApiError) as info:
        bob.buy(dear, 11)
    assert info.value.status == 409
    with pytest.raises(UbcApiError) as info:
        carol.buy(dear, 1)
    assert info.value.status == 403
    carol.cancel_offer(dear)
    assert bob.offers() == []
    with pytest.raises(UbcApiError) as info:
        bob.offer(str(uuid.uuid4()))
    assert info.value.status == 404


def test_a_withdrawal_asked_by_a_member_and_approved_by_the_operator(
    live_server: LiveServer,
) -> None:
    p = people(live_server, "alice", "bob", usd=1000)
    alice, bob, operator = p["alice"], p["bob"], p["operator"]
    item = alice.withdraw(300, external_ref="payout-1", asset="USD")
    assert item["status"] == "pending"
    # The same envelope again is answered as stored; nothing moved yet.
    assert alice.request_withdrawal(item["envelope"])["id"] == item["id"]
    assert _usd(alice) == 1000
    # Someone else's envelope, or another member's key: refused.
    with pytest.raises(UbcApiError) as info:
        bob.request_withdrawal(bob.withdrawal_envelope(5, external_ref="x", account="alice"))
    assert info.value.status == 403
    with pytest.raises(UbcApiError) as info:
        alice.withdraw(1, external_ref="payout-1", asset="USD")  # the reference is waiting
    assert info.value.status == 409
    with pytest.raises(UbcApiError) as info:
        alice.withdrawals()  # only the operator lists everyone's
    assert info.value.status == 403
    assert [w["id"] for w in alice.withdrawals(account="alice")] == [item["id"]]
    assert [w["id"] for w in operator.withdrawals("pending")] == [item["id"]]
    receipt = operator.approve_withdrawal(item["id"])
    assert receipt["effects"][0]["amount"] == 300
    assert _usd(alice) == 700
    assert operator.withdrawals("pending") == []
    assert operator.withdrawal(item["id"])["status"] == "done"
    with pytest.raises(UbcApiError) as info:
        operator.approve_withdrawal(item["id"])
    assert info.value.status == 409
    # Idempotent on external_ref: a new envelope with a used reference is refused.
    with pytest.raises(UbcApiError) as info:
        alice.withdraw(1, external_ref="payout-1", asset="USD")
    assert info.value.status == 409
    assert _usd(alice) == 700


def _usd(member: UbcClient) -> int:
    return next(b["available"] for b in member.balance()["balances"] if b["asset"] == "USD")


@pytest.mark.postgres
def test_concurrent_buyers_never_oversell_one_offer_on_postgresql(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two server processes' worth of writers (two servers on one database) and threads
    calling submit() directly, all filling one offer at once."""
    template_name: str = request.getfixturevalue("postgres_template")
    name = f"ubc_race_{os.getpid()}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    data = make_data_dir(tmp_path / "data")
    try:
        with run_server(url, data) as one, run_server(url, data) as two:
            _race(url, data, one, two)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _race(url: str, data: Path, one: LiveServer, two: LiveServer) -> None:
    handles = [f"buyer{i}" for i in range(18)]
    p = people(one, "seller", *handles, cu=100, usd=10_000, read=False)
    offer_id = p["seller"].sell(50, 5000)["id"]
    book = Book(url, data)
    try:
        for handle in handles:
            book.keys[handle] = p[handle].key  # type: ignore[assignment]
        start = threading.Barrier(len(handles))

        def buy(index: int) -> int:
            handle = handles[index]
            start.wait()
            if index % 3 == 2:  # in-process writers, each its own transaction
                [outcome] = book.submit(book.fill(handle, offer_id, 3))
                return 201 if isinstance(outcome, envelopes.Accepted) else outcome.status_code
            server = one if index % 3 == 0 else two
            buyer = UbcClient(server.url, key=p[handle].key, handle=handle, origin=ORIGIN)
            try:
                buyer.buy(offer_id, 3)
                return 201
            except UbcApiError as error:
                return error.status
            finally:
                buyer.close()

        with concurrent.futures.ThreadPoolExecutor(len(handles)) as pool:
            statuses = list(pool.map(buy, range(len(handles))))
        assert statuses.count(201) == 16  # 16 × 3 = 48 of 50
        assert set(statuses) == {201, 409}
        offer = p["seller"].offer(offer_id)
        assert offer["remaining_amount"] == 2
        bought = sum(
            available
            for (address, asset), available in book.balances().items()
            if address.startswith("member:buyer") and asset == "CU"
        )
        assert bought == len(handles) * 100 + 48
        book.check_invariants()
        assert book.audit().findings == []
    finally:
        book.close()


runner = CliRunner()


@pytest.fixture
def sqlite_server(sqlite_template: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """A served ledger on SQLite only: the command line does not depend on the engine (the
    HTTP tests above run on both)."""
    path = tmp_path / "cli.db"
    shutil.copyfile(sqlite_template, path)
    data = make_data_dir(tmp_path / "data")
    with run_server(f"sqlite:///{path}", data, clock=ManualClock()) as server:
        yield server


def test_the_market_from_the_command_line(sqlite_server: LiveServer, tmp_path: Path) -> None:
    live_server = sqlite_server
    p = people(live_server, "bob", usd=1000)
    seller_dir = tmp_path / "alice"
    env = {
        "UBC_CONFIG_DIR": str(seller_dir),
        "UBC_SERVER": live_server.url,
        "UBC_TOKEN": None,
        "UBC_DATA_DIR": str(live_server.data_dir),
        "COLUMNS": "200",
    }

    def run(*args: str, ok: bool = True) -> str:
        result = runner.invoke(cli, list(args), env=env)
        assert "Traceback" not in result.output
        assert (result.exit_code == 0) is ok, result.output
        return " ".join(result.output.split())

    run("keys", "new", "--handle", "alice")
    run("member", "register")
    run("member", "admit", "alice", "--tier", "basic")
    run("deposit", "alice", "100", "--ref", "alice-cu")
    run("apikey", "create", "--scopes", "read")
    out = run("market", "sell", "5", "--price", "5", "--expires", "1s")
    short_lived = out.rsplit("Offer id: ", 1)[1].strip()
    out = run("market", "sell", "30", "--price", "300", "--expires", "2h")
    offer_id = out.rsplit("Offer id: ", 1)[1].strip()
    assert "Offered 30 CU for $3.00" in out
    assert offer_id in run("market", "list")
    assert "$0.1000" in run("market", "list")
    p["bob"].buy(offer_id, 10)
    assert "sell" in run("market", "trades")
    out = run("market", "cancel", offer_id)
    assert "20 CU came back to you" in out
    # The one-second offer's time passes (the server's clock moves to 2 s after now), and
    # one round of the server's sweeper journals its expiry.
    live_server.clock.set(utcnow() + timedelta(seconds=2))
    sweep_once(live_server.app)
    assert p["operator"].offer(short_lived)["status"] == "expired"
    assert "No open offers" in run("market", "list")
    assert short_lived not in run("market", "list")
    assert "is cancelled" in run("market", "cancel", offer_id, ok=False)
    assert "expires" in run("market", "sell", "1", "--price", "1", "--expires", "soon", ok=False)
    # A withdrawal asked by alice, approved by the operator (whose key and token are in
    # UBC_DATA_DIR).
    out = run("withdraw", "150", "--asset", "USD", "--ref", "payout-9")
    too_much = out.rsplit("approve ", 1)[1].strip()
    assert too_much in run("withdrawals", "pending")
    out = run("withdrawals", "approve", too_much, ok=False)
    assert "member:alice has 100 USD available, 150 needed" in out
    assert "No withdrawals are waiting" in run("withdrawals", "pending")  # it failed
    out = run("withdraw", "60", "--asset", "USD", "--ref", "payout-10")
    withdrawal_id = out.rsplit("approve ", 1)[1].strip()
    assert "Paid out $0.60 from member:alice" in run("withdrawals", "approve", withdrawal_id)
    assert "No withdrawals are waiting" in run("withdrawals", "pending")
    # The sweeper journaled the short-lived offer's expiry.
    assert p["operator"].offer(short_lived)["status"] == "expired"
    assert not _open_in(live_server)
    assert p["operator"].offer(short_lived)["closed_by"] is not None
    cu = [b for b in p["operator"].balance("alice")["balances"] if b["asset"] == "CU"]
    assert cu[0]["available"] == 100 - 10  # 10 sold; the 20 cancelled and the 5 expired back


def _open_in(server: LiveServer) -> bool:
    engine = make_engine(server.db_url)
    try:
        with engine.connect() as connection:
            return bool(
                connection.execute(
                    text("SELECT count(*) FROM offers WHERE status = 'open'")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_a_withdrawal_may_wait_for_the_operator_a_transfer_may_not(book: Book) -> None:
    alice = book.member("alice", usd=100)
    book.member("bob")
    signed = utcnow() - timedelta(hours=2)
    late = book.envelope(
        "withdrawal",
        "alice",
        created_at=signed,
        from_=alice,
        asset="USD",
        amount=40,
        external_ref="payout-late",
    )
    # The operator countersigns two hours later: inside the approval window.
    envelope = Envelope.from_json(late)
    cosigned = add_signature(envelope, book.operator).to_json()
    receipt = book.one(cosigned)
    assert receipt.effects[0]["amount"] == 40
    stale = book.envelope(
        "transfer",
        "alice",
        created_at=signed,
        from_=alice,
        to="member:bob",
        asset="USD",
        amount=1,
    )
    error = book.refused(stale, 400)
    assert "outside the accepted window" in error.message
    # Past the window (7 days by default) a withdrawal is refused too.
    ancient = book.envelope(
        "withdrawal",
        "alice",
        created_at=utcnow() - timedelta(days=8),
        from_=alice,
        asset="USD",
        amount=1,
        external_ref="payout-ancient",
    )
    book.refused(add_signature(Envelope.from_json(ancient), book.operator).to_json(), 400)


def test_the_market_fee_setting_is_journaled(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ubc.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    data = make_data_dir(tmp_path / "data")
    fees = []
    for setting in (250, 100, None):
        with run_server(url, data, market_fee_bps=setting) as server:
            fees.append(httpx.get(f"{server.url}/api/ledger").json()["market_fee_bps"])
    assert fees == [250, 100, 100]
    types = [json.loads(e)["envelope"]["payloadType"] for _, e in from_database(url).entries]
    assert types == [
        "application/vnd.ubc.ledger.genesis+json",
        "application/vnd.ubc.ledger.config+json",
    ]
