"""A read replica (issue 17): a real PostgreSQL primary and a streaming standby started by
the tests (tests/pg_replica.py), ubc serving over real HTTP with ``UBC_READ_DATABASE_URL``.

Replay is paused on the standby to make it stale on purpose: a read without a journal
size then shows the replica's old state (so it was the replica that answered), and a read
that asks for the size of a write just made shows that write (the primary answered).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from tests.conftest import REQUIRE_POSTGRES, LiveServer, make_data_dir, run_server
from tests.pg_replica import ReplicaPair, Unavailable, start_pair
from ubc.cli import app as cli
from ubc.client import UbcApiError, UbcClient
from ubc.clock import ManualClock
from ubc.db import make_engine
from ubc.db.replica import ReadReplica
from ubc.migrations import upgrade
from ubc.signing import generate_signing_key

SIZE = "UBC-Journal-Size"
MIN_SIZE = "UBC-Min-Journal-Size"
TEMPLATE = "ubc_replica_tpl"
_counter = itertools.count()


@pytest.fixture(scope="session")
def replica_pair() -> Iterator[ReplicaPair]:
    try:
        pair = start_pair()
    except Unavailable as exc:
        if REQUIRE_POSTGRES:
            pytest.fail(f"{exc}; UBC_REQUIRE_POSTGRES=1 makes it mandatory")
        pytest.skip(str(exc))
    try:
        with psycopg.connect(pair.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        engine = make_engine(pair.url(TEMPLATE))
        upgrade(engine)
        engine.dispose()
        yield pair
    finally:
        pair.stop()


@dataclass
class Replicated:
    """A fresh migrated database on the primary, replicated to the standby."""

    pair: ReplicaPair
    name: str

    @property
    def primary_url(self) -> str:
        return self.pair.url(self.name)

    @property
    def replica_url(self) -> str:
        return self.pair.url(self.name, standby=True)

    def journal_size(self, *, standby: bool = False) -> int:
        with psycopg.connect(self.pair.conninfo(self.name, standby=standby)) as conn:
            row = conn.execute("SELECT size FROM journal_head WHERE id = 1").fetchone()
            assert row is not None
            return int(row[0])


@pytest.fixture
def replicated(replica_pair: ReplicaPair) -> Iterator[Replicated]:
    name = f"ubc_r_{next(_counter)}"
    with psycopg.connect(replica_pair.conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    replica_pair.wait_replayed()
    yield Replicated(replica_pair, name)
    # Whatever the test left: the standby running and replaying.
    if not (replica_pair.standby_dir / "postmaster.pid").exists():
        replica_pair.start_standby()
    replica_pair.resume_replay()
    with psycopg.connect(replica_pair.conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def server(replicated: Replicated, tmp_path: Path) -> Iterator[LiveServer]:
    with run_server(
        replicated.primary_url,
        make_data_dir(tmp_path / "data"),
        clock=ManualClock(),
        read_database_url=replicated.replica_url,
    ) as live:
        yield live


@pytest.fixture
def operator(server: LiveServer) -> Iterator[UbcClient]:
    with UbcClient(server.url, key=server.operator_key, token=server.operator_token) as client:
        yield client


def join(server: LiveServer, operator: UbcClient, handle: str, cu: int) -> UbcClient:
    """A registered, admitted member holding ``cu`` CU, reading with its own API key."""
    client = UbcClient(server.url, key=generate_signing_key())
    client.register(handle)
    operator.admit(handle, "basic")
    if cu:
        operator.deposit(handle, cu, external_ref=f"seed-{handle}")
    client.token, _ = client.grant_api_key("test")
    return client


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    return response.text


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of ``name{labels}`` in a scrape, or None if it is absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


def counter(url: str, name: str, labels: str = "") -> float:
    return metric(scrape(url), name, labels) or 0.0


def cu_available(body: dict[str, Any]) -> int:
    [balance] = [b for b in body["balances"] if b["asset"] == "CU"]
    return int(balance["available"])


@pytest.mark.postgres
def test_reads_go_to_the_replica_and_a_member_reads_its_own_write(
    server: LiveServer, operator: UbcClient, replicated: Replicated
) -> None:
    pair = replicated.pair
    alice = join(server, operator, "alice", 100)
    join(server, operator, "bob", 0).close()
    pair.wait_replayed()
    served = counter(server.url, "ubc_replica_reads_total")
    assert cu_available(alice.balance()) == 100
    assert counter(server.url, "ubc_replica_reads_total") > served

    pair.pause_replay()
    before = replicated.journal_size(standby=True)
    receipt = alice.send("bob", 30)
    # The write reached the primary only, and answered the size it produced.
    assert alice.journal_size == receipt["seq"] + 1 == replicated.journal_size()
    assert replicated.journal_size(standby=True) == before

    account = f"{server.url}/api/accounts/member:alice"
    auth = {"Authorization": f"Bearer {alice.token}"}
    # Without a journal size: the replica answers, with its (stale) state.
    assert cu_available(httpx.get(account, headers=auth).json()) == 100
    # With the size of the write: the primary answers, with the write.
    behind = counter(server.url, "ubc_replica_fallbacks_total", 'reason="behind"')
    fresh = httpx.get(account, headers={**auth, MIN_SIZE: str(alice.journal_size)})
    assert cu_available(fresh.json()) == 70
    assert counter(server.url, "ubc_replica_fallbacks_total", 'reason="behind"') == behind + 1
    # A browser's page: the console's scripts keep the size in a cookie (a bad one is
    # ignored, a page is not refused for it).
    cookie = {"ubc_journal_size": str(alice.journal_size)}
    assert cu_available(httpx.get(account, headers=auth, cookies=cookie).json()) == 70
    junk = {"ubc_journal_size": "soon"}
    assert cu_available(httpx.get(account, headers=auth, cookies=junk).json()) == 100
    # The client sends it by itself: its own write, at once.
    assert cu_available(alice.balance()) == 70
    assert [i["amount"] for i in alice.history()["items"]][0] == -30

    # The journal too: checkpoint, proofs and entries as of the replica, or of the write.
    checkpoint = httpx.get(f"{server.url}/journal/checkpoint").text
    assert checkpoint.splitlines()[1] == str(before)
    assert alice.checkpoint().splitlines()[1] == str(alice.journal_size)
    proof = f"{server.url}/journal/proof/inclusion?seq={receipt['seq']}"
    assert httpx.get(proof).status_code == 400  # beyond the replica's journal
    assert httpx.get(proof, headers={MIN_SIZE: str(alice.journal_size)}).status_code == 200
    entries = f"{server.url}/journal/entries?start={receipt['seq']}&end={receipt['seq'] + 1}"
    assert httpx.get(entries).json()["entries"] == []
    found = httpx.get(entries, headers={**auth, MIN_SIZE: str(alice.journal_size)}).json()
    assert [e["seq"] for e in found["entries"]] == [receipt["seq"]]
    assert "entry" in found["entries"][0]  # alice's own entry: her key (checked on the primary)

    pair.resume_replay()
    pair.wait_replayed()
    assert cu_available(httpx.get(account, headers=auth).json()) == 70
    alice.close()


@pytest.mark.postgres
def test_a_write_through_one_host_is_read_through_another(
    server: LiveServer, operator: UbcClient, replicated: Replicated, tmp_path: Path
) -> None:
    """Two hosts on one primary and one replica: a write through the first, then a read of
    it through the second with the size the write answered."""
    alice = join(server, operator, "alice", 50)
    join(server, operator, "bob", 0).close()
    replicated.pair.wait_replayed()
    with run_server(
        replicated.primary_url, server.data_dir, read_database_url=replicated.replica_url
    ) as other:
        replicated.pair.pause_replay()
        answer = httpx.post(
            f"{server.url}/api/envelopes",
            json=alice.envelope(
                "transfer", from_="member:alice", to="member:bob", asset="CU", amount=20
            ),
        )
        assert answer.status_code == 201, answer.text
        size = answer.headers[SIZE]
        assert int(size) == answer.json()["seq"] + 1
        account = f"{other.url}/api/accounts/member:alice"
        auth = {"Authorization": f"Bearer {alice.token}"}
        assert cu_available(httpx.get(account, headers=auth).json()) == 50  # the replica
        read = httpx.get(account, headers={**auth, MIN_SIZE: size})
        assert cu_available(read.json()) == 30
        # A Python client handed the size reads it through the other host too.
        with UbcClient(other.url, token=alice.token, handle="alice") as reader:
            reader.journal_size = int(size)
            assert cu_available(reader.balance()) == 30
    alice.close()


@pytest.mark.postgres
def test_the_command_line_reads_its_own_writes_from_one_command_to_the_next(
    server: LiveServer, operator: UbcClient, replicated: Replicated, tmp_path: Path
) -> None:
    """Each ``ubc`` command is its own process with its own client: the journal size of a
    write is kept in the config dir, so the next command's reads ask for it."""
    config_dir = tmp_path / "alice"
    env = {"UBC_CONFIG_DIR": str(config_dir), "UBC_TOKEN": None, "UBC_SERVER": None}

    def ubc(*args: str) -> str:
        result = CliRunner().invoke(cli, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.stdout

    ubc("keys", "new", "--handle", "alice", "--server", server.url)
    ubc("member", "register")
    operator.admit("alice", "basic")
    operator.deposit("alice", 100, external_ref="seed-alice")
    join(server, operator, "bob", 0).close()
    ubc("apikey", "create", "--label", "laptop")
    replicated.pair.wait_replayed()

    replicated.pair.pause_replay()
    ubc("send", "bob", "30")
    sizes = json.loads((config_dir / "journal-sizes.json").read_text())
    assert sizes == {server.url: replicated.journal_size()}
    assert ubc("balance").strip() == "member:alice has 70 CU, $0.00 available."
    # Without the remembered size the same command reads the stale replica.
    (config_dir / "journal-sizes.json").unlink()
    assert ubc("balance").strip() == "member:alice has 100 CU, $0.00 available."
    # A damaged file only costs freshness, never the command.
    (config_dir / "journal-sizes.json").write_text("{not json")
    assert ubc("balance").strip() == "member:alice has 100 CU, $0.00 available."


@pytest.mark.postgres
def test_the_replica_down_sends_reads_to_the_primary(
    server: LiveServer, operator: UbcClient, replicated: Replicated
) -> None:
    alice = join(server, operator, "alice", 100)
    join(server, operator, "bob", 0).close()
    replicated.pair.wait_replayed()
    assert cu_available(alice.balance()) == 100  # a pooled connection to the replica
    replica: ReadReplica = server.app.state.replica
    replica.retry_down = 0.2

    replicated.pair.stop_standby()
    down = counter(server.url, "ubc_replica_fallbacks_total", 'reason="down"')
    # Writes go on (the primary); reads too, from the primary, counted.
    alice.send("bob", 10)
    account = f"{server.url}/api/accounts/member:alice"
    auth = {"Authorization": f"Bearer {alice.token}"}
    for _ in range(3):
        answer = httpx.get(account, headers=auth)
        assert answer.status_code == 200, answer.text
        assert cu_available(answer.json()) == 90
    assert httpx.get(f"{server.url}/api/epochs").status_code == 200
    text = scrape(server.url)
    assert (metric(text, "ubc_replica_fallbacks_total", 'reason="down"') or 0) >= down + 4
    assert metric(text, "ubc_replica_up") == 0
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200  # the primary serves: still ready, and says so
    assert ready.json()["status"] == "ok"
    assert ready.json()["replica"]["status"] == "down"

    replicated.pair.start_standby()
    replicated.pair.wait_replayed()
    served = counter(server.url, "ubc_replica_reads_total")
    time.sleep(replica.retry_down)  # the replica is tried again after this long
    assert cu_available(httpx.get(account, headers=auth).json()) == 90
    assert counter(server.url, "ubc_replica_reads_total") == served + 1
    assert httpx.get(f"{server.url}/readyz").json()["replica"]["status"] == "ok"
    alice.close()


@pytest.mark.postgres
def test_lag_is_in_metrics_and_readyz(
    server: LiveServer, operator: UbcClient, replicated: Replicated
) -> None:
    alice = join(server, operator, "alice", 100)
    join(server, operator, "bob", 0).close()
    replicated.pair.wait_replayed()
    text = scrape(server.url)
    assert metric(text, "ubc_replica_up") == 1
    assert metric(text, "ubc_replica_lag_entries") == 0
    assert metric(text, "ubc_replica_lag_seconds") == 0
    assert metric(text, "ubc_replica_replay_paused") == 0
    replica = httpx.get(f"{server.url}/readyz").json()["replica"]
    assert (replica["status"], replica["lag_entries"], replica["lag_seconds"]) == ("ok", 0, 0)

    replicated.pair.pause_replay()
    alice.send("bob", 1)
    server.clock.advance(5)
    alice.send("bob", 2)
    server.clock.advance(2)
    text = scrape(server.url)
    assert metric(text, "ubc_replica_lag_entries") == 2
    # The oldest entry the replica lacks was committed 7 s ago (the ledger's clock).
    assert metric(text, "ubc_replica_lag_seconds") == 7
    assert (metric(text, "ubc_replica_replay_lag_seconds") or 0) > 0  # PostgreSQL's own
    assert metric(text, "ubc_replica_replay_paused") == 1
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200  # a lagging replica does not fail readiness
    replica = ready.json()["replica"]
    assert (replica["status"], replica["lag_entries"], replica["lag_seconds"]) == ("paused", 2, 7)

    replicated.pair.resume_replay()
    replicated.pair.wait_replayed()
    text = scrape(server.url)
    assert metric(text, "ubc_replica_lag_entries") == 0
    assert metric(text, "ubc_replica_replay_paused") == 0
    assert httpx.get(f"{server.url}/readyz").json()["replica"]["status"] == "ok"
    alice.close()


@pytest.mark.postgres
def test_the_utilization_report_streams_from_where_the_read_was_routed(
    server: LiveServer, operator: UbcClient, replicated: Replicated
) -> None:
    """The CSV report reads on in a session of its own: on the replica, or on the primary
    when the replica lacks the size asked for."""
    alice = join(server, operator, "alice", 0)
    join(server, operator, "bob", 0).close()
    operator.submit(
        operator.envelope(
            "epoch.open",
            epoch=1,
            asset="CU",
            allocations={"basic": 10},
            starts_at="2026-01-01T00:00:00Z",
            ends_at="2099-01-01T00:00:00Z",
        )
    )
    deadline = time.monotonic() + 30
    while operator._get("/api/epochs/1")["status"] != "open":  # the background job
        assert time.monotonic() < deadline
        time.sleep(0.05)
    replicated.pair.wait_replayed()
    replicated.pair.pause_replay()
    sent = alice.send("bob", 3)
    url = f"{server.url}/api/reports/utilization?epoch=1"
    auth = {"Authorization": f"Bearer {server.auditor_token}", "Accept": "text/csv"}
    stale = httpx.get(url, headers=auth)
    fresh = httpx.get(url, headers={**auth, MIN_SIZE: str(sent["seq"] + 1)})
    assert stale.status_code == fresh.status_code == 200
    assert stale.text != fresh.text
    replicated.pair.resume_replay()
    replicated.pair.wait_replayed()
    assert httpx.get(url, headers=auth).text == fresh.text
    alice.close()


@pytest.mark.postgres
def test_withdrawals_and_api_keys_are_read_on_the_primary(
    server: LiveServer, operator: UbcClient, replicated: Replicated
) -> None:
    """What is not journaled (a withdrawal asked for) and who is reading (a key granted or
    revoked a moment ago) are read on the primary, whatever the replica's lag."""
    alice = join(server, operator, "alice", 0)
    operator.deposit("alice", 500, asset="USD", external_ref="usd-alice")
    replicated.pair.wait_replayed()
    replicated.pair.pause_replay()
    secret, _ = alice.grant_api_key("fresh")
    fresh = httpx.get(
        f"{server.url}/api/members/alice", headers={"Authorization": f"Bearer {secret}"}
    )
    assert fresh.status_code == 200, fresh.text  # the key is known at once
    asked = alice.withdraw(100, external_ref="payout-1")
    plain = UbcClient(server.url, token=alice.token)  # knows no journal size
    assert plain.withdrawal(asked["id"])["id"] == asked["id"]
    plain.close()
    alice.close()


def test_a_replica_must_be_postgresql(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ubc.db'}")
    with pytest.raises(ValueError, match="UBC_READ_DATABASE_URL must be a PostgreSQL URL"):
        ReadReplica(f"sqlite:///{tmp_path / 'other.db'}", primary=engine)
    engine.dispose()


# --- without a replica: the headers on every engine ------------------------------------


@pytest.mark.parametrize(
    "value", ["abc", "-1", "1.5", "1e3", "12345678901234567890", "１".encode()]
)
def test_a_bad_min_journal_size_is_refused(live_server: LiveServer, value: str | bytes) -> None:
    answer = httpx.get(f"{live_server.url}/api/epochs", headers={MIN_SIZE: value})
    assert answer.status_code == 400
    assert answer.json()["error"]["detail"]["header"] == MIN_SIZE


def test_writes_answer_the_journal_size(live_server: LiveServer) -> None:
    with UbcClient(
        live_server.url, key=live_server.operator_key, token=live_server.operator_token
    ) as operator:
        alice = UbcClient(live_server.url, key=generate_signing_key())
        receipt = alice.register("alice")
        assert alice.journal_size == receipt["seq"] + 1
        batch = operator.submit_batch(
            [
                operator.envelope(
                    "deposit", to="member:alice", amount=5, asset="CU", external_ref=f"d{i}"
                )
                for i in range(3)
            ]
        )
        assert operator.journal_size == max(r.receipt["seq"] for r in batch if r.receipt) + 1
        size = httpx.get(f"{live_server.url}/journal/checkpoint").text.splitlines()[1]
        assert operator.journal_size == int(size)
        # Without a replica the header changes nothing; a size beyond the journal's too.
        answer = httpx.get(f"{live_server.url}/api/epochs", headers={MIN_SIZE: "999999"})
        assert answer.status_code == 200
        with pytest.raises(UbcApiError):
            operator.submit(operator.envelope("member.admit", handle="nobody", tier="basic"))
        assert operator.journal_size == int(size)  # a refusal produced no size
        alice.close()
