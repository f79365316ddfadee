"""A newcomer's first hour (issue 15): each wall they hit, as a test.

The CLI runs in-process against a served ledger (SQLite: the command line does not
depend on the engine; the README tour runs on both, ``tests/test_readme_tour.py``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import POSTGRES_URL, LiveServer, _postgres_problem
from tests.test_cli_member import Person
from ubc import apikey_routes
from ubc.cli import app as cli
from ubc.cli._errors import explain, run
from ubc.cli._output import amount, signed_amount
from ubc.client import UbcClient, api_key_hash
from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.dburl import missing_sqlite_file, normalise_database_url
from ubc.ledger import service as ledger
from ubc.ledger.service import LedgerRequest, Leg

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def served(live_server: LiveServer) -> LiveServer:
    """The live server with the API-key listing route (until ``ubc/app.py`` includes it)."""
    paths = {getattr(r, "path", None) for r in live_server.app.router.routes}
    if "/api/accounts/{address}/apikeys" not in paths:
        live_server.app.include_router(apikey_routes.router)
    return live_server


class Tour:
    """An operator and two members, each at their own terminal."""

    def __init__(self, server: LiveServer, root: Path) -> None:
        self.server = server
        self.op = Person(root / "op", UBC_DATA_DIR=str(server.data_dir), UBC_SERVER=server.url)
        self.alice = Person(
            root / "alice", UBC_SERVER=server.url, UBC_DATA_DIR=str(server.data_dir)
        )
        self.bob = Person(root / "bob", UBC_SERVER=server.url)
        for person, handle in ((self.alice, "alice"), (self.bob, "bob")):
            person.ok("keys", "new", "--handle", handle)
            person.ok("member", "register")
            self.op.ok("member", "admit", handle, "--tier", "basic")
        self.op.ok("deposit", "alice", "500", "--ref", "seed-alice")


@pytest.fixture
def tour(served: LiveServer, tmp_path: Path) -> Tour:
    return Tour(served, tmp_path)


def one_line(text: str) -> str:
    return " ".join(text.split())


# --- the tour -----------------------------------------------------------------------------


@sqlite_only
def test_a_relative_config_dir_works_and_a_second_keys_new_refuses(
    served: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bob = Person(Path("./bob"), UBC_SERVER=served.url)
    bob.ok("keys", "new", "--handle", "bob")
    assert bob.config()["key"] == "member.key"  # relative to the config dir
    assert "Registered member:bob" in bob.ok("member", "register")
    assert "already exists at bob/member.key" in bob.fails("keys", "new", "--handle", "bob")
    # The config dir may move: its paths are relative to it.
    Path("bob").rename("bob-moved")
    moved = Person(Path("./bob-moved"), UBC_SERVER=served.url)
    assert "already exists" in moved.fails("keys", "new")


@sqlite_only
def test_proof_get_uses_the_members_saved_api_key(tour: Tour, tmp_path: Path) -> None:
    tour.alice.ok("apikey", "create")
    sent = tour.alice.ok("send", "bob", "5")
    seq = re.search(r"journal entry (\d+)", sent)
    assert seq
    out = tmp_path / "receipt.tlog-proof"
    result = tour.alice.run(
        "proof", "get", seq.group(1), "--server", tour.server.url, "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    assert out.exists()


@sqlite_only
def test_audit_export_defaults_to_the_configured_database(
    tour: Tour, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "journal.jsonl"
    auditor = Person(tmp_path / "auditor", UBC_DATABASE_URL=tour.server.db_url)
    auditor.ok("audit", "export", "-o", str(out))
    assert len(out.read_text().splitlines()) > 5
    # A SQLite file that is not there is refused, not created empty.
    message = auditor.run("audit", "export", "sqlite:///nowhere.db", "-o", "x.jsonl").output
    assert "no SQLite database at nowhere.db" in one_line(message)
    assert not (tmp_path / "nowhere.db").exists()
    assert not (tmp_path / "x.jsonl").exists()


# --- one line instead of a traceback ------------------------------------------------------


def run_main(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """``ubc ARGS`` through the real entry point's handler: (exit status, stderr)."""
    monkeypatch.setenv("UBC_CONFIG_DIR", str(Path.cwd() / "config"))
    with pytest.raises(SystemExit) as exited:
        run(cli, args)
    err = capsys.readouterr().err
    code = exited.value.code
    return (code if isinstance(code, int) else 1), err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_expected_failures_are_one_line_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UBC_DEBUG", raising=False)
    monkeypatch.delenv("UBC_TOKEN", raising=False)
    code, err = run_main(["proof", "check", "missing.txt", "--vkey", "v"], capsys, monkeypatch)
    assert (code, err.strip()) == (1, "Error: no such file: missing.txt")

    port = _closed_port()
    url = f"http://127.0.0.1:{port}"
    code, err = run_main(["proof", "get", "3", "--server", url], capsys, monkeypatch)
    assert code == 1
    assert err.strip() == f"Error: cannot reach the server at {url}: is `ubc serve` running?"
    # The members' commands say the same.
    code, err = run_main(["models", "--server", url], capsys, monkeypatch)
    assert "is `ubc serve` running?" in err
    assert "Traceback" not in err


@pytest.mark.postgres
def test_a_missing_postgres_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if _postgres_problem() is not None:
        pytest.skip("PostgreSQL unreachable")
    monkeypatch.chdir(tmp_path)
    missing = POSTGRES_URL.rsplit("/", 1)[0] + f"/ubc_missing_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("UBC_DATABASE_URL", missing)
    code, err = run_main(["db", "upgrade"], capsys, monkeypatch)
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "cannot open the database" in err
    assert "does not exist" in err
    assert "createdb ubc_missing_" in err
    # ubc restore --into a database that does not exist: the same line.
    export = tmp_path / "journal.jsonl"
    export.write_text('{"format": "ubc-journal/v1"}\n')
    code, err = run_main(
        ["restore", str(export), "--into", missing, "--vkey", "v"], capsys, monkeypatch
    )
    assert code == 1
    assert "Traceback" not in err


def test_unexpected_errors_point_at_ubc_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    boom = typer.Typer()

    @boom.command()
    def fail() -> None:
        raise KeyError("a bug")

    monkeypatch.delenv("UBC_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        run(boom, [])
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert err.strip() == (
        "Error: unexpected error: KeyError: 'a bug' (set UBC_DEBUG=1 for the traceback)"
    )
    monkeypatch.setenv("UBC_DEBUG", "1")
    with pytest.raises(SystemExit):
        run(boom, [])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().endswith("Error: unexpected error: KeyError: 'a bug'")


def test_setup_errors_are_explained() -> None:
    from ubc.gateway.catalog import ModelsFileError
    from ubc.runtime import SetupError

    problem = "cannot read the models file /nowhere: [Errno 2] No such file or directory"
    assert explain(ModelsFileError(problem)) == problem
    assert explain(SetupError(problem)) == problem
    assert explain(FileNotFoundError(2, "No such file", "x.toml")) == "no such file: x.toml"
    assert explain(RuntimeError("?")) is None


def test_postgres_urls_as_providers_give_them() -> None:
    driver = "postgresql+psycopg://u:p@db.example.com:5432/ubc?sslmode=require"
    assert normalise_database_url("postgres://u:p@db.example.com:5432/ubc?sslmode=require") == (
        driver
    )
    assert normalise_database_url("postgresql://u:p@db.example.com:5432/ubc?sslmode=require") == (
        driver
    )
    assert normalise_database_url(" POSTGRES://h/db ") == "postgresql+psycopg://h/db"
    for unchanged in (driver, "sqlite:///ubc.db", "sqlite://", "postgresql+asyncpg://h/db"):
        assert normalise_database_url(unchanged) == unchanged
    assert missing_sqlite_file("sqlite:///surely/not/here.db") == "surely/not/here.db"
    assert missing_sqlite_file("sqlite://") is None
    assert missing_sqlite_file(driver) is None


def test_a_normalised_postgres_url_opens_with_psycopg() -> None:
    engine = make_engine(normalise_database_url("postgres://u@127.0.0.1:1/db"))
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


# --- keys ---------------------------------------------------------------------------------


@sqlite_only
def test_api_keys_by_label_replace_list_and_revoke(tour: Tour) -> None:
    alice = tour.alice
    first = alice.ok("apikey", "create").strip().splitlines()[-1]
    # A second create under the same label would lose the first secret: refused.
    message = alice.fails("apikey", "create")
    assert "already have an API key labelled 'cli'" in message
    assert "--replace" in message
    laptop = alice.ok(
        "apikey",
        "create",
        "--label",
        "laptop",
        "--scope",
        "models",
        "--spend-cap",
        "100",
        "--model",
        "all-minilm-l6-v2",
        "--expires",
        "30d",
        "--rpm",
        "60",
        "--tpm",
        "10000",
    )
    laptop_secret = laptop.strip().splitlines()[-1]
    assert (alice.config_dir / "api_keys" / "laptop").read_text().strip() == laptop_secret

    # Spend per key: one call through the model endpoint with the laptop key.
    answer = httpx.post(
        f"{tour.server.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {laptop_secret}"},
        json={"model": "all-minilm-l6-v2", "input": "compute for everyone"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text

    listed = json.loads(alice.ok("apikey", "list", "--json"))
    keys = {k["label"]: k for k in listed["apikeys"]}
    assert set(keys) == {"cli", "laptop"}
    grant = keys["laptop"]
    assert grant["key_hash"] == api_key_hash(laptop_secret)
    assert (grant["scopes"], grant["spend_cap_per_epoch"], grant["models"]) == (
        ["models"],
        100,
        ["all-minilm-l6-v2"],
    )
    assert (grant["rpm"], grant["tpm"], grant["revoked"]) == (60, 10000, False)
    assert grant["expires_at"] is not None
    assert grant["calls"] == 1
    assert grant["spent"] >= 1
    assert keys["cli"]["spent"] == 0
    table = one_line(alice.ok("apikey", "list"))
    assert "laptop" in table
    assert "cap 100 CU/epoch" in table
    assert "60 rpm" in table

    # --replace revokes the old key once the new one is granted.
    out = alice.ok("apikey", "create", "--replace")
    second = out.strip().splitlines()[-1]
    assert "Revoked the old key 'cli'" in out
    with (
        UbcClient(tour.server.url, token=first) as old,
        UbcClient(tour.server.url, token=second) as new,
    ):
        assert new.balance("alice")["address"] == "member:alice"
        with pytest.raises(Exception, match="401|invalid|revoked|unknown"):
            old.balance("alice")

    # Revoke by label: the secret is forgotten here, and the key stops working.
    out = alice.ok("apikey", "revoke", "laptop")
    assert out.startswith("Revoked API key 'laptop' (")
    assert not (alice.config_dir / "api_keys" / "laptop").exists()
    listed = json.loads(alice.ok("apikey", "list", "--json"))
    revoked = {k["label"]: k["revoked"] for k in listed["apikeys"] if k["label"] == "laptop"}
    assert revoked == {"laptop": True}
    assert "no API key labelled 'nope'" in alice.fails("apikey", "revoke", "nope")


@sqlite_only
def test_a_steward_grants_a_key_on_the_cause(tour: Tour) -> None:
    tour.op.ok(
        "cause",
        "register",
        "open-research",
        "--name",
        "Open research",
        "--description",
        "public science",
        "--steward",
        "alice",
    )
    out = tour.alice.ok(
        "apikey", "create", "--label", "cluster", "--scope", "models", "--account",
        "cause:open-research",
    )  # fmt: skip
    assert "on cause:open-research" in out
    secret = out.strip().splitlines()[-1]
    with UbcClient(tour.server.url, token=tour.server.operator_token) as op:
        [grant] = op.api_keys("cause:open-research")
    assert grant["key_hash"] == api_key_hash(secret)
    assert "not a steward of cause:open-research" in tour.bob.fails(
        "apikey", "create", "--account", "cause:open-research"
    )


# --- output -------------------------------------------------------------------------------


@sqlite_only
def test_tables_fit_80_columns_and_listings_print_json_and_csv(
    tour: Tour, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    op80 = Person(
        tmp_path / "op", UBC_DATA_DIR=str(tour.server.data_dir), UBC_SERVER=tour.server.url,
        COLUMNS="80",
    )  # fmt: skip
    op80.ok("epoch", "open", "--epoch", "1", "--allocation", "basic=1000", "--carryover-cap", "9")
    tour.alice.ok("apikey", "create")
    tour.alice.ok("send", "bob", "30", "--memo", "a memo long enough to need more than a line")
    op80.ok("epoch", "close", "1")

    report = op80.ok("report", "utilization", "--epoch", "1")
    for header in ("allocated", "received", "donated", "expired", "used %", "USD allocated"):
        assert header in report, report
    assert "…" not in report
    assert max(len(line) for line in report.splitlines()) <= 80
    alice80 = Person(tour.alice.config_dir, UBC_SERVER=tour.server.url, COLUMNS="80")
    history = alice80.ok("history")
    assert "…" not in history
    assert max(len(line) for line in history.splitlines()) <= 80
    assert "a memo long" in history  # the memo column is not two characters wide

    # --csv is a flag printing CSV on stdout; --output FILE writes a file; `--csv -` no file.
    rows = list(
        csv.DictReader(io.StringIO(op80.ok("report", "utilization", "--epoch", "1", "--csv")))
    )
    assert {r["address"] for r in rows} == {"member:alice", "member:bob"}
    assert op80.run("report", "utilization", "--epoch", "1", "--csv", "-").exit_code != 0
    assert not (tmp_path / "-").exists()
    written = tmp_path / "epoch-1.csv"
    assert "Wrote 2 rows" in op80.ok(
        "report", "utilization", "--epoch", "1", "--output", str(written)
    )
    assert written.read_text().startswith("address,")

    # --json on every listing.
    for person, args in (
        (alice80, ["balance"]),
        (alice80, ["history"]),
        (alice80, ["usage"]),
        (alice80, ["models"]),
        (op80, ["epoch", "list"]),
        (op80, ["epoch", "show", "1"]),
        (op80, ["report", "utilization", "--epoch", "1"]),
        (op80, ["cause", "list"]),
        (alice80, ["donations"]),
        (op80, ["market", "list"]),
        (alice80, ["market", "trades"]),
        (op80, ["withdrawals", "pending"]),
        (alice80, ["apikey", "list"]),
    ):
        parsed = json.loads(person.ok(*args, "--json"))
        assert isinstance(parsed, dict), args


def test_amounts_carry_their_unit() -> None:
    assert amount(30, "CU") == "30 CU"
    assert amount(150, "USD") == "$1.50"
    assert amount(123456, "USD") == "$1,234.56"
    assert signed_amount(-5, "USD") == "-$0.05"
    assert signed_amount(12, "CU") == "+12 CU"


@sqlite_only
def test_send_minus_five_says_the_amount_must_be_positive(tour: Tour) -> None:
    assert "the amount must be a positive integer, not -5" in tour.alice.fails("send", "bob", "-5")
    assert "positive integer, not 0" in tour.alice.fails("send", "bob", "0")
    assert "positive integer" in tour.op.fails("deposit", "alice", "-1", "--ref", "r")


@sqlite_only
def test_a_hold_shows_as_held_in_history(tour: Tour) -> None:
    tour.alice.ok("apikey", "create")
    engine = make_engine(tour.server.db_url)
    try:
        leg = Leg(
            "member:alice", "system:consumption", "CU", 12, "usage", timeout=timedelta(hours=1)
        )
        with unit_of_work(make_session_factory(engine)) as session:
            ledger.apply(session, LedgerRequest(uuid.uuid4().hex, (leg,)))
    finally:
        engine.dispose()
    history = tour.alice.ok("history")
    [row] = [line for line in history.splitlines() if "usage" in line]
    assert "usage (held)" in row
    assert "-12 CU held" in row
    assert "+0 CU" not in history
    assert "(held $0.00)" not in tour.alice.ok("balance")
    assert "held 12 CU" in tour.alice.ok("balance")


@sqlite_only
def test_a_tier_no_epoch_named_needs_new_tier(tour: Tour) -> None:
    tour.op.ok("epoch", "open", "--epoch", "1", "--allocation", "basic=10")
    carol = Person(tour.alice.config_dir.parent / "carol", UBC_SERVER=tour.server.url)
    carol.ok("keys", "new", "--handle", "carol")
    carol.ok("member", "register")
    message = tour.op.fails("member", "admit", "carol", "--tier", "basci")
    assert "no epoch has allocated to tier 'basci' (epochs named: basic)" in message
    assert "--new-tier" in message
    assert "into tier pro" in tour.op.ok("member", "admit", "carol", "--tier", "pro", "--new-tier")


@sqlite_only
def test_a_member_without_an_api_key_is_told_who_reads(tour: Tour) -> None:
    # alice's terminal can see the operator's token in ./ubc-data: said, not silent.
    result = tour.alice.run("balance")
    assert result.exit_code == 0
    assert "No API key of member:alice" in one_line(result.stderr)
    assert "as the operator" in one_line(result.stderr)


@sqlite_only
def test_a_repeated_deposit_ref_is_done_or_a_conflict(tour: Tour) -> None:
    out = tour.op.ok("deposit", "alice", "500", "--ref", "seed-alice")
    assert out.startswith("Already done: deposit 'seed-alice' credited 500 CU to member:alice")
    message = tour.op.fails("deposit", "alice", "50", "--ref", "seed-alice")
    assert "conflict: --ref seed-alice was already used for 500 CU to member:alice" in message
    with UbcClient(tour.server.url, token=tour.server.operator_token) as op:
        [cu] = [b for b in op.balance("alice")["balances"] if b["asset"] == "CU"]
    assert cu["posted"] == 500


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never the user's own ``~/.config/ubc`` (``ubc proof get`` reads a saved key)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return


def test_the_cli_runner_and_the_entry_point_agree() -> None:
    # `ubc --help` lists the new commands.
    out = CliRunner().invoke(cli, ["apikey", "--help"], env={"COLUMNS": "120"}).output
    for command in ("create", "list", "revoke"):
        assert command in out
