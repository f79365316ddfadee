"""Failures answer in the documented shape (issue 12): range errors in query parameters are
400s; a database unreachable or full answers 503 with ``Retry-After`` and fails
``/readyz``; a PostgreSQL backend terminated under a server (a restart, a failover) costs
no request; another member's withdrawal id is 404, like an unknown one.

Real databases throughout: a full disk is a small tmpfs (as root) or SQLite's
``max_page_count``; an unreachable PostgreSQL database is one that refuses connections
while its backends are terminated.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL, LiveServer, _admin_conninfo, make_data_dir, run_server
from ubc import db
from ubc.client import UbcClient
from ubc.signing import generate_signing_key

BIG = str(10**30)
ABOVE_BIGINT = str(2**63)
_open: list[UbcClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def people(server: LiveServer, *handles: str, cu: int = 1000) -> dict[str, UbcClient]:
    """The operator and admitted, funded members, each with a read API key; and ``sink``,
    the member that ``post_transfer`` pays."""
    operator = UbcClient(server.url, key=server.operator_key, token=server.operator_token)
    _open.append(operator)
    found = {"operator": operator}
    for handle in (*handles, "sink"):
        member = UbcClient(server.url, key=generate_signing_key(), handle=handle)
        _open.append(member)
        member.register()
        operator.admit(handle, "basic")
        operator.deposit(handle, cu, "CU", external_ref=f"{handle}-cu")
        operator.deposit(handle, cu, "USD", external_ref=f"{handle}-usd")
        member.token, _ = member.grant_api_key("read", scopes=["read"])
        found[handle] = member
    return found


def get(server: LiveServer, path: str, token: str | None = None) -> httpx.Response:
    token = token or server.operator_token
    return httpx.get(server.url + path, headers={"authorization": f"Bearer {token}"}, timeout=60)


def pay_sink(sender: UbcClient, memo: str | None = None) -> dict[str, Any]:
    return sender.envelope(
        "transfer", from_=sender.address, to="member:sink", asset="CU", amount=1, memo=memo
    )


def post_transfer(server: LiveServer, sender: UbcClient, memo: str | None = None) -> httpx.Response:
    envelope = pay_sink(sender, memo)
    return httpx.post(server.url + "/api/envelopes", json=envelope, timeout=60)


def assert_error(response: httpx.Response, status: int, type_: str | None = None) -> Any:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "detail"}
    if type_ is not None:
        assert body["error"]["type"] == type_
    return body["error"]


def assert_unavailable(response: httpx.Response) -> None:
    error = assert_error(response, 503, "unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert error["detail"]["retry_after"] == int(response.headers["retry-after"])


# --- range errors ---------------------------------------------------------------------------


def test_out_of_range_query_parameters_are_400s_not_500s(live_server: LiveServer) -> None:
    p = people(live_server, "alice")
    p["operator"].register_cause("open-research", "Open research", "Papers", ["alice"])
    p["alice"].donate("open-research", 5)
    refused = {
        # date arithmetic past 9999-12-31 or before 0001-01-01 overflowed (both engines)
        "/api/accounts/member:alice/usage?until=9999-12-31": 400,
        "/api/accounts/member:alice/usage?since=9999-12-31&until=9999-12-31": 400,
        "/api/accounts/member:alice/usage?until=0001-01-01": 400,
        "/api/accounts/member:alice/usage?since=0001-01-01": 400,
        # cursors past BIGINT overflowed in the driver
        f"/api/accounts/member:alice/history?cursor={BIG}": 400,
        f"/api/accounts/member:alice/history?cursor={ABOVE_BIGINT}": 400,
        f"/api/accounts/member:alice/donations?cursor={BIG}": 400,
        f"/api/market/trades?account=member:alice&cursor={BIG}": 400,
        f"/api/market/trades?cursor={ABOVE_BIGINT}": 400,
        # journal positions past BIGINT: FastAPI's query validation
        f"/journal/entries?start={ABOVE_BIGINT}&end={2**63 + 1}": 422,
        f"/journal/proof/inclusion?seq={ABOVE_BIGINT}": 422,
        f"/journal/proof/consistency?old=1&new={ABOVE_BIGINT}": 422,
    }
    for path, status in refused.items():
        assert_error(get(live_server, path), status)
    usage = get(live_server, "/api/accounts/member:alice/usage?since=1970-01-01&until=9999-12-30")
    assert usage.status_code == 200, usage.text
    assert get(live_server, "/api/accounts/member:alice/history?cursor=99").status_code == 200
    assert get(live_server, f"/journal/entries?start={2**63 - 2}&end={2**63 - 1}").is_success


# --- withdrawals of others -------------------------------------------------------------------


def test_another_members_withdrawal_is_404_like_an_unknown_one(live_server: LiveServer) -> None:
    p = people(live_server, "alice", "bob")
    item = p["alice"].withdraw(5, external_ref="payout-1", asset="USD")
    assert get(live_server, f"/api/withdrawals/{item['id']}", p["alice"].token).status_code == 200
    foreign = get(live_server, f"/api/withdrawals/{item['id']}", p["bob"].token)
    unknown_id = str(uuid.uuid4())
    unknown = get(live_server, f"/api/withdrawals/{unknown_id}", p["bob"].token)
    assert_error(foreign, 404, "not_found")
    assert_error(unknown, 404, "not_found")
    assert foreign.json()["error"]["message"].replace(item["id"], "ID") == unknown.json()["error"][
        "message"
    ].replace(unknown_id, "ID")


# --- terminated PostgreSQL backends ------------------------------------------------------------


def _terminate_backends(database: str) -> int:
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_terminated_postgres_backends_cost_no_request(live_server: LiveServer) -> None:
    p = people(live_server, "alice", "bob")
    alice, bob = p["alice"], p["bob"]
    reads = [
        ("/api/ledger", None),
        ("/api/accounts/member:alice", alice.token),
        ("/api/accounts/member:alice/history", alice.token),
        ("/api/members/bob", bob.token),
        ("/readyz", None),
    ]

    def write(n: int) -> httpx.Response:
        return post_transfer(live_server, alice if n % 2 else bob, memo=f"after restart {n}")

    database = str(make_url(live_server.db_url).database)
    for _round in range(2):
        # Warm every pool (writer, readers) with several connections, then kill them all.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda r: get(live_server, r[0], r[1]), reads * 3))
            list(pool.map(write, range(6)))
        assert _terminate_backends(database) > 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            read_answers = list(pool.map(lambda r: get(live_server, r[0], r[1]), reads * 2))
            write_answers = list(pool.map(write, range(8)))
        for response in read_answers:
            assert response.status_code == 200, (response.request.url, response.text)
        for response in write_answers:
            assert response.status_code == 201, response.text
    # Every accepted transfer is there once.
    history = get(live_server, "/api/accounts/member:sink/history?limit=1000")
    assert len(history.json()["items"]) == 2 * (6 + 8) + 2  # and its two deposits


# --- an unreachable database --------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_unreachable_database_is_503_and_not_ready(live_server: LiveServer) -> None:
    p = people(live_server, "alice")
    database = str(make_url(live_server.db_url).database)
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        _terminate_backends(database)
        assert_unavailable(post_transfer(live_server, p["alice"]))
        assert_unavailable(get(live_server, "/api/accounts/member:alice", p["alice"].token))
        assert_unavailable(get(live_server, "/api/ledger"))
        ready = get(live_server, "/readyz")
        assert ready.status_code == 503
        assert "unreachable" in ready.json()["reason"]
        assert int(ready.headers["retry-after"]) > 0
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    assert post_transfer(live_server, p["alice"]).status_code == 201
    assert get(live_server, "/readyz").status_code == 200


# --- a full database -------------------------------------------------------------------------


def _fill_until_refused(server: LiveServer, sender: UbcClient) -> httpx.Response:
    for n in range(2000):
        response = post_transfer(server, sender, memo=f"{n:04d} " + "x" * 250)
        if response.status_code != 201:
            return response
    raise AssertionError("the database never filled up")


def _assert_full_then_recovers(
    server: LiveServer, sender: UbcClient, free_space: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "FULL_MEMORY_S", 1.0, raising=False)
    refused = _fill_until_refused(server, sender)
    assert_unavailable(refused)
    assert refused.json()["error"]["detail"]["reason"] == "database_full"
    # A batch (a group commit): answered 503 whole, nothing of it applied. Small writes may
    # still fit in a page that has room: fill on until one does not.
    for _ in range(200):
        batch = [pay_sink(sender, "y" * 250) for _ in range(3)]
        answer = httpx.post(server.url + "/api/envelopes/batch", json={"envelopes": batch})
        if answer.status_code != 200:
            break
    assert_unavailable(answer)
    ready = get(server, "/readyz")
    assert ready.status_code == 503, ready.text
    assert "full" in ready.json()["reason"]
    assert get(server, "/api/ledger").status_code == 200  # reads still work
    free_space()
    accepted = post_transfer(server, sender, memo="space again")
    assert accepted.status_code == 201, accepted.text
    _eventually_ready(server)


def _eventually_ready(server: LiveServer) -> None:
    deadline = time.monotonic() + 10
    while True:
        ready = get(server, "/readyz")
        if ready.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ready.status_code == 200, ready.text


def test_a_full_sqlite_database_is_503_and_not_ready(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite at its page limit (``max_page_count``) is exactly SQLITE_FULL."""
    if not db.is_sqlite(db_url):
        pytest.skip("SQLite's page limit; PostgreSQL fills a real disk below")
    limit: dict[str, int | None] = {"pages": None}
    with run_server(db_url, make_data_dir(tmp_path / "data")) as server:

        @event.listens_for(server.app.state.engine, "checkout")
        def _limit(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            pages = limit["pages"] or 2**31
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

        p = people(server, "alice")

        def free_space() -> None:
            limit["pages"] = None

        limit["pages"] = 1  # PRAGMA max_page_count never goes below the current size
        _assert_full_then_recovers(server, p["alice"], free_space, monkeypatch)


# --- a full disk (root: a small tmpfs) ---------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(size_mb: int) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs root to mount a small tmpfs")
    base = Path(tempfile.mkdtemp(prefix="ubc-full-", dir="/tmp"))
    base.chmod(0o755)
    point = base / "disk"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        shutil.rmtree(base)
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def fill(path: Path) -> Path:
    """Take every free byte of ``path``'s file system; delete the file to give it back."""
    filler = path / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_503_and_not_ready_on_sqlite(
    sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_tmpfs(8) as disk:
        path = disk / "ubc.db"
        shutil.copyfile(sqlite_template, path)
        with run_server(f"sqlite:///{path}", make_data_dir(tmp_path / "data")) as server:
            p = people(server, "alice")
            filler = fill(disk)
            _assert_full_then_recovers(server, p["alice"], filler.unlink, monkeypatch)


@pytest.mark.postgres
def test_a_full_disk_is_503_and_not_ready_on_postgres(
    postgres_template: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test database lives in a tablespace on a small tmpfs (WAL stays on the main disk)."""
    with small_tmpfs(24) as disk:
        shutil.chown(disk, "postgres", "postgres")
        name = f"ubc_full_{os.getpid()}"
        space = f"ubc_full_{os.getpid()}"
        url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLESPACE \"{space}\" LOCATION '{disk}'")
            conn.execute(
                f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}" TABLESPACE "{space}"'
            )
        try:
            with run_server(url, make_data_dir(tmp_path / "data")) as server:
                p = people(server, "alice")
                filler = fill(disk)
                _assert_full_then_recovers(server, p["alice"], filler.unlink, monkeypatch)
        finally:
            with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'DROP TABLESPACE IF EXISTS "{space}"')


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_model_call_while_the_database_is_unreachable_is_503_in_openai_shape(
    live_server: LiveServer,
) -> None:
    p = people(live_server, "alice")
    secret, _ = p["alice"].grant_api_key("calls", scopes=["models"])

    def embed() -> httpx.Response:
        return httpx.post(
            live_server.url + "/v1/embeddings",
            json={"model": "all-minilm-l6-v2", "input": "a cat"},
            headers={"authorization": f"Bearer {secret}"},
            timeout=60,
        )

    assert embed().status_code == 200  # the key and the model are warm in the caches
    database = str(make_url(live_server.db_url).database)
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        _terminate_backends(database)
        refused = embed()
        assert refused.status_code == 503, refused.text
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert refused.json()["error"]["code"] == "database_unavailable"
        assert int(refused.headers["retry-after"]) > 0
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    assert embed().status_code == 200
