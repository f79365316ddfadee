"""Causes: registration by the operator, donations, stewards spending and granting keys,
what a non-steward cannot do, the public reads and a donor's receipts, the CLI."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import LiveServer, make_data_dir, run_server
from tests.test_market import (  # noqa: F401  (_close_clients: an autouse fixture)
    Book,
    _close_clients,
    client,
    empty,
    module_database,
    people,
)
from ubc.cli import app as cli
from ubc.client import UbcApiError, api_key_hash, new_api_key_secret
from ubc.db import unit_of_work
from ubc.envelopes import service as envelopes
from ubc.ledger import service as ledger
from ubc.metering.rules import hold_request_id

module_db = module_database("causes")


@pytest.fixture
def book(module_db: str, tmp_path: Path) -> Iterator[Book]:
    empty(module_db)
    made = Book(module_db, make_data_dir(tmp_path / "data"))
    yield made
    made.close()


def register(book: Book, slug: str, *stewards: str, **extra: Any) -> dict[str, Any]:
    return book.envelope(
        "cause.register",
        "operator",
        slug=slug,
        name=extra.get("name", slug.title()),
        description=extra.get("description", "what it does"),
        stewards=list(stewards),
    )


def send(book: Book, signer: str, src: str, dst: str, amount: int) -> dict[str, Any]:
    return book.envelope("transfer", signer, from_=src, to=dst, asset="CU", amount=amount)


def grant(book: Book, signer: str, account: str) -> dict[str, Any]:
    return book.envelope(
        "apikey.grant",
        signer,
        account=account,
        key_hash=api_key_hash(new_api_key_secret()),
        label="models",
        scopes=["models"],
    )


def test_register_donate_and_spend_as_a_steward(book: Book) -> None:
    book.member("alice", cu=100)
    book.member("bob", cu=100)
    book.member("steward")
    receipt = book.one(register(book, "malaria", "steward"))
    assert receipt.effects == []
    # Accounts in every asset of the ledger.
    assert book.available("cause:malaria", "CU") == 0
    assert book.available("cause:malaria", "USD") == 0
    donation = book.one(send(book, "alice", "member:alice", "cause:malaria", 30))
    assert donation.effects[0]["kind"] == "donation"
    book.one(send(book, "bob", "member:bob", "cause:malaria", 20))
    book.one(send(book, "alice", "member:alice", "cause:malaria", 5))
    out = book.one(send(book, "steward", "cause:malaria", "member:bob", 12))
    assert out.effects[0]["kind"] == "transfer"
    book.one(grant(book, "steward", "cause:malaria"))
    with book.sessions() as session:
        from ubc.causes import service

        cause = service.get_cause(session, "malaria")
    assert cause["donated"] == {"CU": 55}
    assert cause["donors"] == 2
    assert cause["sent"] == {"CU": 12}
    assert cause["spent"] == {"CU": 12}
    assert cause["balances"] == {"CU": 43, "USD": 0}
    assert cause["stewards"] == ["steward"]
    book.check_invariants()
    assert book.audit().findings == []


def test_compute_used_on_models_counts_as_spent(book: Book) -> None:
    """A model call billed to the cause (a gateway hold posted by a ``usage`` entry)."""
    book.set_fee(0)
    config = book.config()
    config["models"] = {"tiny": {"input": 1000, "output": 2000}}
    import json

    from ubc.envelopes.payloads import format_timestamp, validate_payload

    config.update(id=str(uuid.uuid4()), created_at=format_timestamp(book_now()))
    signed = envelopes.sign_payload(
        validate_payload("ledger.config", json.loads(json.dumps(config))),
        "ledger.config",
        [book.ledger_key, book.operator],
    )
    book.accept(signed.to_json(), internal=True)
    book.member("alice", cu=100)
    book.member("steward")
    book.one(register(book, "malaria", "steward"))
    book.one(send(book, "alice", "member:alice", "cause:malaria", 50))
    key = grant(book, "steward", "cause:malaria")
    book.one(key)
    key_hash = json_payload(key)["key_hash"]
    request_id = str(uuid.uuid4())
    with unit_of_work(book.sessions) as session:
        ledger.apply(
            session,
            ledger.LedgerRequest(
                hold_request_id(request_id),
                (
                    ledger.Leg(
                        "cause:malaria",
                        "system:consumption",
                        "CU",
                        20,
                        "usage",
                        timeout=timedelta(minutes=5),
                    ),
                ),
            ),
        )
    usage = book.envelope(
        "usage",
        "ledger",
        account="cause:malaria",
        key_hash=key_hash,
        request_id=request_id,
        model="tiny",
        input_tokens=3,
        output_tokens=4,
        held=20,
        cost=11,  # ceil((3 × 1000 + 4 × 2000) / 1000)
    )
    book.one(usage, internal=True)
    with book.sessions() as session:
        from ubc.causes import service

        cause = service.get_cause(session, "malaria")
    assert cause["used_on_models"] == {"CU": 11}
    assert cause["spent"] == {"CU": 11}
    assert cause["balances"]["CU"] == 39


def book_now() -> Any:
    from ubc.dbtypes import utcnow

    return utcnow()


def json_payload(envelope: dict[str, Any]) -> dict[str, Any]:
    import base64
    import json

    body: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return body


def test_bad_cause_operations_are_refused_and_change_nothing(book: Book) -> None:
    book.member("alice", cu=100)
    book.member("mallory", cu=100)
    book.member("steward")
    book.one(register(book, "malaria", "steward"))
    book.one(send(book, "alice", "member:alice", "cause:malaria", 40))
    # A donation to a cause that does not exist.
    book.refused(send(book, "alice", "member:alice", "cause:nowhere", 10), 404)
    # A non-steward spending the cause's compute, or granting a key on it.
    book.refused(send(book, "mallory", "cause:malaria", "member:mallory", 10), 403, "forbidden")
    book.refused(grant(book, "mallory", "cause:malaria"), 403, "forbidden")
    # A steward of an unknown cause.
    book.refused(send(book, "steward", "cause:nowhere", "member:steward", 1), 404)
    # More than the cause has.
    book.refused(send(book, "steward", "cause:malaria", "member:alice", 41), 409)
    # Registrations: not the operator, a taken slug, unknown or repeated stewards.
    not_operator = register(book, "other", "steward")
    forged = book.envelope(
        "cause.register",
        "alice",
        slug="other",
        name="Other",
        description="",
        stewards=["alice"],
    )
    book.refused(forged, 403)
    del not_operator
    book.refused(register(book, "malaria", "steward"), 409)
    book.refused(register(book, "other", "ghost"), 404)
    book.refused(register(book, "other", "steward", "steward"), 400)
    book.refused(
        book.envelope(
            "cause.update", "operator", slug="nowhere", name="N", description="", stewards=["alice"]
        ),
        404,
    )
    book.check_invariants()


def test_update_replaces_the_stewards(book: Book) -> None:
    book.member("alice", cu=10)
    book.member("old")
    book.member("new")
    book.one(register(book, "water", "old"))
    book.one(send(book, "alice", "member:alice", "cause:water", 10))
    book.one(
        book.envelope(
            "cause.update",
            "operator",
            slug="water",
            name="Clean water",
            description="wells",
            stewards=["new"],
        )
    )
    book.refused(send(book, "old", "cause:water", "member:old", 1), 403)
    book.one(send(book, "new", "cause:water", "member:new", 1))
    with book.sessions() as session:
        from ubc.causes import service

        cause = service.get_cause(session, "water")
    assert (cause["name"], cause["description"], cause["stewards"]) == (
        "Clean water",
        "wells",
        ["new"],
    )
    assert book.audit().findings == []


# --- over HTTP and the CLI ------------------------------------------------------------------


def test_causes_and_receipts_over_http(live_server: LiveServer) -> None:
    p = people(live_server, "alice", "bob", "steward", cu=100)
    alice, bob, steward, operator = p["alice"], p["bob"], p["steward"], p["operator"]
    operator.register_cause("malaria", "Malaria research", "nets and drugs", ["steward"])
    first = alice.donate("malaria", 25, "for nets")
    alice.donate("cause:malaria", 5)
    bob.donate("malaria", 10)
    out = steward.submit(
        steward.envelope("transfer", from_="cause:malaria", to="member:bob", asset="CU", amount=7)
    )
    assert out["effects"][0]["debit"] == "cause:malaria"
    public = client(live_server)  # no token: causes are public
    [cause] = public.causes()
    assert cause["donated"] == {"CU": 40}
    assert cause["donors"] == 2
    assert cause["spent"] == {"CU": 7}
    assert public.cause("malaria")["balances"]["CU"] == 33
    with pytest.raises(UbcApiError) as info:
        public.cause("nowhere")
    assert info.value.status == 404
    receipts, cursor = alice.donations()
    assert [r["amount"] for r in receipts] == [5, 25]
    assert cursor is None
    assert receipts[1]["id"] == first["id"]
    assert receipts[1]["seq"] == first["seq"]
    assert receipts[1]["memo"] == "for nets"
    assert receipts[1]["cause"] == "cause:malaria"
    page, cursor = alice.donations(limit=1)
    assert len(page) == 1
    assert cursor is not None
    with pytest.raises(UbcApiError) as info:
        bob.donations("alice")  # another member's receipts
    assert info.value.status == 403
    assert len(operator.donations("alice")[0]) == 2
    with pytest.raises(UbcApiError) as info:
        bob.donate("nowhere", 1)
    assert info.value.status == 404


@pytest.fixture
def cli_server(sqlite_template: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """The command line on SQLite only (it does not depend on the engine)."""
    path = tmp_path / "cli.db"
    shutil.copyfile(sqlite_template, path)
    with run_server(f"sqlite:///{path}", make_data_dir(tmp_path / "data")) as server:
        yield server


def test_causes_from_the_command_line(cli_server: LiveServer, tmp_path: Path) -> None:
    live_server = cli_server
    people(live_server, "steward")
    runner = CliRunner()
    env = {
        "UBC_CONFIG_DIR": str(tmp_path / "alice"),
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

    assert "No causes yet" in run("cause", "list")
    out = run(
        "cause",
        "register",
        "malaria",
        "--name",
        "Malaria research",
        "--description",
        "nets",
        "--steward",
        "steward",
    )
    assert "Registered cause:malaria" in out
    assert "no member ghost" in run(
        "cause",
        "register",
        "x1",
        "--name",
        "X",
        "--description",
        "",
        "--steward",
        "ghost",
        ok=False,
    )
    run("keys", "new", "--handle", "alice")
    run("member", "register")
    run("member", "admit", "alice", "--tier", "basic")
    run("deposit", "alice", "50", "--ref", "alice-50")
    run("apikey", "create", "--scopes", "read")
    assert "Donated 20 CU to cause:malaria" in run("donate", "malaria", "20")
    assert "no account cause:nowhere" in run("donate", "nowhere", "1", ok=False)
    assert "Malaria research" in run("cause", "list")
    shown = run("cause", "show", "malaria")
    assert "20 CU" in shown
    assert "steward" in shown
    assert "cause:malaria" in run("donations")
    out = run(
        "cause",
        "update",
        "malaria",
        "--name",
        "Malaria",
        "--description",
        "nets",
        "--steward",
        "alice",
    )
    assert "Updated cause:malaria" in out
