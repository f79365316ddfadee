"""Several hosts on one database (issue 17, item 4): separate ``ubc serve`` processes, each
on its own port (one of them with two workers), against one database.

What is proved, against real processes and the real database (no mocks):

- both accept signed writes at the same time, and the journal stays one journal: seqs
  0..n-1 without a gap, every checkpoint either host served is the one tree's (one root per
  size, sizes never going back on a host), ``ubc audit verify --against`` the database
  finds nothing, and balances are what the accepted transfers make them;
- a member registered through one host acts through the other; an API key revoked through
  one host is refused by the other on its very next request;
- each background job runs in one process of all (``ubc.db.leader``): the leader gauge is
  1 on one host and 0 on the other, expired holds are expired once each by the leader
  only; when the leader is killed, the other host takes the jobs over.

On SQLite the same runs as two processes of one host sharing the database file (the
leader lock is then a ``flock``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from tests.conftest import _admin_conninfo, _free_port, answers, make_data_dir
from tests.upstream import run_upstream
from ubc.cli import app as cli
from ubc.client import UbcClient, api_key_hash
from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.db.leader import Leaders, lock_key
from ubc.gateway.metering import Held, HoldRequest, place_holds
from ubc.journal import store
from ubc.journal.checkpoint import parse_checkpoint
from ubc.journal.models import JournalEntry
from ubc.migrations import current_revision, head_revision, upgrade
from ubc.signing import generate_signing_key, load_signing_key

MODELS_TOML = """
[models."chat-small"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-chat"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000
max_output_tokens = 64
"""
JOBS = ("hold-sweep", "epochs")
HANDLES = ("alba", "bruno", "chiara", "dario")
DEPOSIT = 10_000
#: A test of PostgreSQL's advisory locks: ``db_url`` of that engine only.
POSTGRES_ONLY = pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


# --- processes ---------------------------------------------------------------------------


def _start(
    port: int, environment: dict[str, str], log: Path, workers: int
) -> subprocess.Popen[bytes]:
    """``ubc serve`` on ``port`` in a session of its own (so that the whole process group,
    workers included, can be killed at once), once it answers."""
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", "from ubc.cli import main; main()", "serve"]
            + ["--port", str(port), "--workers", str(workers)],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    if answers(process, f"http://127.0.0.1:{port}", "/readyz"):
        return process
    _kill(process)
    raise AssertionError(f"the server on {port} did not start:\n{log.read_text()}")


def _kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def leader(url: str, job: str) -> float:
    return scrape(url).get(("ubc_background_leader", (("job", job),)), 0.0)


def holds_expired(url: str) -> float:
    return scrape(url).get(("ubc_holds_expired_total", ()), 0.0)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- the test ----------------------------------------------------------------------------


def test_two_hosts_share_one_ledger(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    with run_upstream(api_key="sk-upstream") as upstream:
        models = tmp_path / "models.toml"
        models.write_text(MODELS_TOML.format(api_base=upstream.api_base))
        data = make_data_dir(tmp_path / "data")
        environment = {
            **os.environ,
            "UBC_DATABASE_URL": db_url,
            "UBC_DATA_DIR": str(data),
            "UBC_MODELS_FILE": str(models),
            "UBC_ORIGIN": "test.ubc/hosts",
            "UBC_TEST_UPSTREAM_KEY": "sk-upstream",
            "UBC_HOLD_SWEEP_INTERVAL_SECONDS": "0.1",
        }
        environment.pop("UBC_REDIS_URL", None)
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        ports = [_free_port(), _free_port()]
        a, b = (f"http://127.0.0.1:{port}" for port in ports)
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        # A (two workers) first: it writes the genesis and takes the jobs.
        host_a = _start(ports[0], environment, logs[0], workers=2)
        host_b: subprocess.Popen[bytes] | None = None
        try:
            wait_for(lambda: all(leader(a, job) == 1 for job in JOBS), "A to lead")
            host_b = _start(ports[1], environment, logs[1], workers=1)
            vkey = httpx.get(f"{a}/api/ledger").json()["vkey"]
            operator_key = load_signing_key(data / "operator.key")
            token = (data / "operator.token").read_text().strip()

            # Members registered through either host, admitted and funded through the other.
            keys = {handle: generate_signing_key() for handle in HANDLES}
            for i, handle in enumerate(HANDLES):
                with UbcClient((a, b)[i % 2], key=keys[handle]) as member:
                    member.register(handle)
                with UbcClient((b, a)[i % 2], key=operator_key, token=token) as operator:
                    operator.admit(handle, "basic")
                    operator.deposit(handle, DEPOSIT, external_ref=f"seed-{handle}")

            # --- concurrent writes through both hosts, checkpoints sampled meanwhile -----
            sent: dict[str, int] = dict.fromkeys(HANDLES, 0)
            received: dict[str, int] = dict.fromkeys(HANDLES, 0)
            seqs: list[int] = []
            notes: dict[str, list[str]] = {a: [], b: []}
            lock = threading.Lock()
            errors: list[BaseException] = []
            writing = threading.Event()
            writing.set()

            def write(index: int, handle: str, url: str) -> None:
                try:
                    with UbcClient(url, key=keys[handle], handle=handle) as member:
                        for n in range(20):
                            to = HANDLES[(index + 1 + n % 3) % len(HANDLES)]
                            receipt = member.send(to, 1 + n % 5)
                            with lock:
                                seqs.append(receipt["seq"])
                                sent[handle] += 1 + n % 5
                                received[to] += 1 + n % 5
                except BaseException as exc:  # reported below
                    errors.append(exc)

            def sample(url: str) -> None:
                with httpx.Client(base_url=url) as http:
                    while writing.is_set():
                        notes[url].append(http.get("/journal/checkpoint").text)

            samplers = [threading.Thread(target=sample, args=(url,)) for url in (a, b)]
            writers = [
                threading.Thread(target=write, args=(i, handle, url))
                for i, handle in enumerate(HANDLES)
                for url in (a, b)
            ]
            for thread in samplers + writers:
                thread.start()
            for thread in writers:
                thread.join()
            writing.clear()
            for thread in samplers:
                thread.join()
            assert not errors, errors
            assert len(set(seqs)) == len(seqs) == 20 * 2 * len(HANDLES)

            # One envelope sent to both hosts at once: applied once, the same receipt twice.
            with UbcClient(a, key=keys["dario"], handle="dario") as dario:
                envelope = dario.envelope(
                    "transfer", from_="member:dario", to="member:alba", asset="CU", amount=7
                )
            with httpx.Client() as http:
                replies: dict[str, httpx.Response] = {}
                racers = [
                    threading.Thread(
                        target=lambda url: replies.__setitem__(
                            url, http.post(f"{url}/api/envelopes", json=envelope)
                        ),
                        args=(url,),
                    )
                    for url in (a, b)
                ]
                for thread in racers:
                    thread.start()
                for thread in racers:
                    thread.join()
            assert sorted(reply.status_code for reply in replies.values()) == [200, 201]
            assert replies[a].json() == replies[b].json()
            sent["dario"] += 7
            received["alba"] += 7

            # Every checkpoint served is the one tree's: one root per size, on each host
            # sizes never going back, each root that of the journal's prefix.
            roots: dict[int, bytes] = {}
            for url, served in notes.items():
                sizes = []
                for note in served:
                    body = parse_checkpoint(note.split("\n\n", 1)[0] + "\n")
                    assert roots.setdefault(body.size, body.root) == body.root, body.size
                    sizes.append(body.size)
                assert sizes == sorted(sizes), f"{url} served an older checkpoint after a newer"
            with sessions() as session:
                for size, root in roots.items():
                    assert store.root(session, size) == root, size

            # Balances, read through both hosts, are what the transfers make them.
            with (
                UbcClient(a, token=token) as reader_a,
                UbcClient(b, token=token) as reader_b,
            ):
                for handle in HANDLES:
                    want = DEPOSIT - sent[handle] + received[handle]
                    for reader in (reader_a, reader_b):
                        balance = reader.balance(f"member:{handle}")
                        assert _available(balance, "CU") == want, (handle, balance)

            # --- an API key revoked through A is refused by B at once ---------------------
            with UbcClient(a, key=keys["alba"], handle="alba") as alba:
                secret, _ = alba.grant_api_key("sdk")
                auth = {"authorization": f"Bearer {secret}"}
                call = {
                    "model": "chat-small",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                }
                # B knows the key (and caches the grant for its early checks).
                assert httpx.get(f"{b}/api/accounts/member:alba", headers=auth).status_code == 200
                answer = httpx.post(f"{b}/v1/chat/completions", headers=auth, json=call, timeout=30)
                assert answer.status_code == 200, answer.text
                alba.revoke_api_key(api_key_hash(secret))
                revoked_at = time.monotonic()
            read = httpx.get(f"{b}/api/accounts/member:alba", headers=auth)
            answer = httpx.post(f"{b}/v1/chat/completions", headers=auth, json=call, timeout=30)
            refused_after = time.monotonic() - revoked_at
            assert read.status_code == 401, read.text
            assert answer.status_code == 401, answer.text
            assert refused_after < 2, refused_after

            # --- one sweeper: A's, until A dies; then B's ----------------------------------
            assert [leader(b, job) for job in JOBS] == [0, 0]
            assert [leader(a, job) for job in JOBS] == [1, 1]
            with UbcClient(a, key=keys["bruno"], handle="bruno") as bruno:
                hold_secret, _ = bruno.grant_api_key("holds")
            first = _orphan_holds(sessions, "member:bruno", api_key_hash(hold_secret), 12)
            wait_for(lambda: _open_holds(sessions) == 0, "the holds to expire")
            assert _expired(sessions) == sorted(first)  # each once
            assert holds_expired(a) == 12
            assert holds_expired(b) == 0

            _kill(host_a)  # the leader (its two workers too), without a chance to step down
            wait_for(lambda: all(leader(b, job) == 1 for job in JOBS), "B to take over")
            second = _orphan_holds(sessions, "member:bruno", api_key_hash(hold_secret), 5)
            wait_for(lambda: _open_holds(sessions) == 0, "B to expire the holds")
            assert _expired(sessions) == sorted(first + second)
            assert holds_expired(b) == 5
            # B still takes writes; the journal goes on.
            with UbcClient(b, key=keys["chiara"], handle="chiara") as chiara:
                chiara.send("dario", 1)
        finally:
            for process in (host_a, host_b):
                if process is not None:
                    _kill(process, signal.SIGTERM)
    logged = logs[0].read_text() + logs[1].read_text()
    assert "leading background job hold-sweep" in logged, logged

    # --- the journal: gapless, and the auditor finds nothing -------------------------------
    with sessions() as session:
        found = session.execute(select(JournalEntry.seq).order_by(JournalEntry.seq)).scalars()
        listed = list(found)
        size, _ = store.latest_checkpoint(session)
    assert listed == list(range(size))
    engine.dispose()
    export = tmp_path / "journal.jsonl"
    runner = CliRunner()
    result = runner.invoke(cli, ["audit", "export", db_url, "-o", str(export)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli, ["audit", "verify", str(export), "--vkey", vkey, "--against", db_url]
    )
    assert result.exit_code == 0, result.output


def _available(account: object, asset: str) -> int:
    balances = account["balances"]  # type: ignore[index]
    for balance in balances:
        if balance["asset"] == asset:
            return int(balance["available"])
    raise AssertionError(f"no {asset} in {account}")


def _orphan_holds(sessions: object, account: str, key_hash: str, count: int) -> list[str]:
    """Holds of model calls that a crashed host left behind, already past their timeout."""
    placed_at = datetime.now(UTC) - timedelta(hours=1)
    requests = [
        HoldRequest(str(uuid.uuid4()), account, key_hash, "chat-small", 10, 1) for _ in range(count)
    ]
    with unit_of_work(sessions) as session:  # type: ignore[arg-type]
        outcomes = place_holds(session, requests, now=placed_at, timeout=timedelta(seconds=1))
    assert all(isinstance(outcome, Held) for outcome in outcomes), outcomes
    return [request.request_id for request in requests]


def _open_holds(sessions: object) -> int:
    with sessions() as session:  # type: ignore[operator]
        return int(
            session.execute(
                text("SELECT count(*) FROM transfers WHERE state = 'pending' AND id LIKE 'hold:%'")
            ).scalar_one()
        )


def _expired(sessions: object) -> list[str]:
    """The call of every journaled hold.expire, sorted (a hold expired twice shows twice)."""
    with sessions() as session:  # type: ignore[operator]
        rows = session.execute(
            select(JournalEntry.entry).where(JournalEntry.type == "hold.expire")  # type: ignore[arg-type]
        ).scalars()
        holds = []
        for entry in rows:
            envelope = json.loads(bytes(entry))["envelope"]
            payload = json.loads(base64.b64decode(envelope["payload"]))
            holds.append(payload["hold_id"].removeprefix("hold:").removesuffix(":0"))
    return sorted(holds)


# --- the leader lock itself ----------------------------------------------------------------


def test_one_leader_per_job_in_turn(db_url: str) -> None:
    """Two processes' worth of locks (two engines): one leads each job, the other takes
    over when it steps down; jobs are independent of each other."""
    engines = [make_engine(db_url), make_engine(db_url)]
    first, second = (Leaders(engine) for engine in engines)
    try:
        assert first.lead_now("hold-sweep")
        assert first.lead_now("hold-sweep")  # kept
        assert not second.lead_now("hold-sweep")
        assert second.lead_now("epochs")  # another job, another lock
        assert not first.lead_now("epochs")
        assert first.is_leading("hold-sweep")
        assert not first.is_leading("epochs")
        first.close()
        assert not first.lead_now("hold-sweep")  # closed: never again
        assert second.lead_now("hold-sweep")
    finally:
        first.close()
        second.close()
        for engine in engines:
            engine.dispose()


@POSTGRES_ONLY
def test_a_lost_leader_connection_hands_the_job_over(db_url: str) -> None:
    """The leader's session ends (its host died, the server dropped it): the lock is
    released by PostgreSQL, another process takes it, and the old leader learns at its
    next round that it no longer leads (every job it led, not only the one it asks)."""
    engines = [make_engine(db_url), make_engine(db_url)]
    first, second = (Leaders(engine) for engine in engines)
    try:
        assert first.lead_now("hold-sweep")
        assert first.lead_now("epochs")
        database = make_url(db_url).database
        with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
            terminated = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks JOIN pg_stat_activity USING (pid)"
                " WHERE locktype = 'advisory' AND datname = %s AND objid = %s",
                (database, lock_key("hold-sweep") & 0xFFFFFFFF),
            ).fetchall()
        assert terminated == [(True,)]
        wait_for(lambda: second.lead_now("hold-sweep"), "the second to lead", timeout=10)
        assert not first.lead_now("hold-sweep")
        assert not first.is_leading("epochs")
        assert second.lead_now("epochs")
    finally:
        first.close()
        second.close()
        for engine in engines:
            engine.dispose()


@POSTGRES_ONLY
def test_hosts_started_at_once_migrate_in_turn(db_url: str) -> None:
    """Every ``ubc serve`` migrates on start: two at once on an empty database migrate one
    after the other (an advisory lock), and the second finds nothing to do."""
    name = f"{make_url(db_url).database}_empty"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(db_url).set(database=name).render_as_string(hide_password=False)
    engines = [make_engine(url), make_engine(url)]
    try:
        failures: list[BaseException] = []

        def migrate(engine: object) -> None:
            try:
                upgrade(engine)  # type: ignore[arg-type]
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=migrate, args=(engine,)) for engine in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert current_revision(engines[0]) == head_revision()
    finally:
        for engine in engines:
            engine.dispose()
        with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
