"""GET /journal/stream over real HTTP on both engines: live entries in order with their seq
as the SSE id, resuming with Last-Event-ID, `from=`, members' streams, access, the limit
of streams, a stalled consumer beside the write path, and `ubc events tail`."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey
from typer.testing import CliRunner

from tests.conftest import LiveServer, _free_port, make_data_dir, run_server
from tests.test_journal_http import bearer, envelope, grant, post, transfer
from ubc.cli import app
from ubc.cli.events import follow, read_events
from ubc.client import UbcClient
from ubc.journal import stream as journal_stream
from ubc.signing import encode_public_key, generate_signing_key


@dataclass
class Ledger:
    server: LiveServer
    client: httpx.Client
    keys: dict[str, SigningKey]
    secrets: dict[str, str]

    @property
    def auditor(self) -> dict[str, str]:
        return bearer(self.server.auditor_token)

    def size(self) -> int:
        return int(self.client.get("/journal/checkpoint").text.split("\n")[1])

    def pay(self, src: str, dst: str, amount: int = 1) -> int:
        return post(self.client, transfer(self.keys[src], src, dst, amount))

    def batch(self, n: int) -> float:
        """Seconds to commit ``n`` transfers alice → carol, one batch."""
        envs = [transfer(self.keys["alice"], "alice", "carol", 1) for _ in range(n)]
        began = time.monotonic()
        answer = self.client.post("/api/envelopes/batch", json={"envelopes": envs})
        took = time.monotonic() - began
        assert answer.status_code == 200, answer.text
        assert {r["status"] for r in answer.json()["results"]} == {201}
        return took


@pytest.fixture
def ledger(live_server: LiveServer) -> Iterator[Ledger]:
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        keys, secrets = members(c, live_server.operator_key)
        yield Ledger(live_server, c, keys, secrets)


def members(c: httpx.Client, operator: SigningKey) -> tuple[dict[str, SigningKey], dict[str, str]]:
    """alice, bob and carol, admitted and holding 100,000 CU each; bob's read key and
    carol's model key (their secrets)."""
    keys = {h: generate_signing_key() for h in ("alice", "bob", "carol")}
    for handle, key in keys.items():
        public = encode_public_key(bytes(key.verify_key))
        post(
            c,
            envelope(
                "member.register",
                [key],
                actor=f"member:{handle}",
                handle=handle,
                public_key=public,
            ),
        )
        post(
            c,
            envelope("member.admit", [operator], actor="operator", handle=handle, tier="basic"),
        )
        post(
            c,
            envelope(
                "deposit",
                [operator],
                actor="operator",
                to=f"member:{handle}",
                asset="CU",
                amount=100_000,
                external_ref=f"bank-{handle}",
            ),
        )
    secrets = {
        "bob-read": grant(c, keys["bob"], "bob", ["read"]),
        "carol-models": grant(c, keys["carol"], "carol", ["models"]),
    }
    return keys, secrets


@contextlib.contextmanager
def stream(
    url: str, headers: dict[str, str] | None = None, **params: Any
) -> Iterator[Iterator[tuple[int, dict[str, Any]]]]:
    """The (seq, data) events of one open stream; the stream is admitted on entry."""
    timeout = httpx.Timeout(30.0, read=20.0)
    with (
        httpx.Client(base_url=url, timeout=timeout) as client,
        client.stream("GET", "/journal/stream", params=params, headers=headers or {}) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        yield read_events(r.iter_lines())


def take(events: Iterator[tuple[int, dict[str, Any]]], n: int) -> list[tuple[int, dict[str, Any]]]:
    return [next(events) for _ in range(n)]


def entry_of(data: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(base64.b64decode(data["entry"]))
    return body


def test_entries_appended_while_streaming_arrive_in_order(ledger: Ledger) -> None:
    with stream(ledger.server.url, ledger.auditor) as events:
        seqs = [ledger.pay("alice", "bob"), ledger.pay("bob", "carol"), ledger.pay("carol", "bob")]
        got = take(events, 3)
    assert [seq for seq, _ in got] == seqs
    for seq, data in got:
        assert data["seq"] == seq == entry_of(data)["seq"]
        assert data["type"] == "transfer"
    # Exactly as GET /journal/entries serves them.
    served = ledger.client.get(
        "/journal/entries", params={"start": seqs[0], "end": seqs[-1] + 1}, headers=ledger.auditor
    ).json()["entries"]
    assert [{k: d[k] for k in ("seq", "leaf_hash", "entry")} for _, d in got] == served


def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(ledger: Ledger) -> None:
    size = ledger.size()
    with stream(ledger.server.url, ledger.auditor, **{"from": 0}) as events:
        first = take(events, 4)
    assert [s for s, _ in first] == [0, 1, 2, 3]
    for _ in range(3):
        ledger.pay("alice", "bob")
    # The header wins over `from` (an EventSource reconnects with the same URL).
    headers = {**ledger.auditor, "Last-Event-ID": "3"}
    with stream(ledger.server.url, headers, **{"from": 0}) as events:
        rest = take(events, size + 3 - 4)
    assert [s for s, _ in first + rest] == list(range(size + 3))
    bad = ledger.client.get("/journal/stream", headers={**ledger.auditor, "Last-Event-ID": "x"})
    assert bad.status_code == 400


def test_the_client_resumes_across_a_server_restart(db_url: str, tmp_path: Path) -> None:
    """A server stopped and started again (same database, same address) while a client
    follows the stream and writes go on before and after: the client's iterator
    reconnects with Last-Event-ID and gets every entry exactly once, in order."""
    data = make_data_dir(tmp_path / "data")
    port = _free_port()
    got: list[int] = []
    written: list[int] = []
    with run_server(db_url, data, port=port, graceful_shutdown=0.2) as first:
        with httpx.Client(base_url=first.url, timeout=30) as c:
            keys, _ = members(c, first.operator_key)
            start = post(c, transfer(keys["alice"], "alice", "bob", 1))
        follower = UbcClient(first.url, token=first.auditor_token)
        events = follower.events(from_seq=start, types=["transfer"], backoff=[0.1])

        def follow_all() -> None:
            for data_ in events:
                got.append(data_["seq"])
                if len(got) == 21:
                    return

        reader = threading.Thread(target=follow_all, daemon=True)
        reader.start()
        with httpx.Client(base_url=first.url, timeout=30) as c:
            written += [post(c, transfer(keys["alice"], "alice", "bob", 1)) for _ in range(10)]
        wait_until(lambda: len(got) == 11)
    # Stopped: the stream was cut; the client retries until the server is back.
    with run_server(db_url, data, port=port) as second, httpx.Client(base_url=second.url) as c:
        written += [post(c, transfer(keys["bob"], "bob", "carol", 1)) for _ in range(10)]
        reader.join(timeout=30)
        assert not reader.is_alive(), got
    follower.close()
    assert got == [start, *written]


def wait_until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_from_the_middle(ledger: Ledger) -> None:
    size = ledger.size()
    with stream(ledger.server.url, ledger.auditor, **{"from": 5}) as events:
        got = take(events, size - 5)
        later = ledger.pay("bob", "alice")
        got += take(events, 1)
    assert [s for s, _ in got] == [*range(5, size), later]


def test_a_members_stream_carries_only_its_entries(ledger: Ledger) -> None:
    for _ in range(2):
        ledger.pay("alice", "carol")  # not bob's
    ledger.pay("alice", "bob")
    size = ledger.size()
    key = bearer(ledger.secrets["bob-read"])
    items = ledger.client.get(
        "/journal/entries", params={"start": 0, "end": size}, headers=key
    ).json()["entries"]
    own = [i["seq"] for i in items if "entry" in i]
    assert own
    assert len(own) < size
    with stream(ledger.server.url, key, **{"from": 0}) as events:
        got = take(events, len(own))
        ledger.pay("alice", "carol")
        mine = ledger.pay("carol", "bob")
        got += take(events, 1)
    assert [s for s, _ in got] == [*own, mine]
    for _, data in got:
        assert "member:bob" in json.dumps(entry_of(data)) or data["type"] != "transfer"


def test_access_as_for_the_entries(ledger: Ledger, tmp_path: Any) -> None:
    url = "/journal/stream"
    assert ledger.client.get(url).status_code == 401
    assert ledger.client.get(url, headers=bearer("ubc_tok_nonsense")).status_code == 401
    answer = ledger.client.get(url, headers=bearer(ledger.secrets["carol-models"]))
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "forbidden"
    assert ledger.client.get(url, params={"from": -1}, headers=ledger.auditor).status_code == 422
    server = ledger.server
    with run_server(server.db_url, server.data_dir, journal_access="public") as public:
        with stream(public.url, **{"from": 0}) as events:
            assert [s for s, _ in take(events, 2)] == [0, 1]
        assert httpx.get(f"{public.url}{url}", headers=bearer("nonsense")).status_code == 401


def test_streams_beyond_the_limit_are_503(ledger: Ledger) -> None:
    server = ledger.server
    with run_server(server.db_url, server.data_dir, journal_stream_max=1) as limited:
        with stream(limited.url, bearer(server.auditor_token), **{"from": 0}) as events:
            take(events, 1)
            answer = httpx.get(f"{limited.url}/journal/stream", headers=ledger.auditor)
            assert answer.status_code == 503
            assert answer.headers["retry-after"]
        # The place is given back when the stream closes.
        deadline = time.monotonic() + 10
        while True:
            with stream(limited.url, ledger.auditor, **{"from": 0}) as events:
                take(events, 1)
                break
            assert time.monotonic() < deadline  # pragma: no cover


def test_a_stalled_stream_does_not_slow_writes(ledger: Ledger) -> None:
    ledger.batch(50)  # warm up
    alone = min(ledger.batch(200) for _ in range(2))
    size = ledger.size()
    timeout = httpx.Timeout(30.0, read=20.0)
    # A small receive buffer: the server's sends block soon after the stream starts.
    small = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    with (
        httpx.Client(base_url=ledger.server.url, timeout=timeout, transport=small) as client,
        client.stream(
            "GET", "/journal/stream", params={"from": 0}, headers=ledger.auditor
        ) as stalled,
    ):
        assert stalled.status_code == 200
        # Nothing is read: the server's sends to this stream block on a full buffer.
        beside = min(ledger.batch(200) for _ in range(2))
        # ... and it lost nothing meanwhile: read on it (slowly, its window is small),
        # then resume from where it is on a fresh connection.
        seqs = [s for s, _ in take(read_events(stalled.iter_lines()), 5)]
    headers = {**ledger.auditor, "Last-Event-ID": str(seqs[-1])}
    with stream(ledger.server.url, headers) as events:
        seqs += [s for s, _ in take(events, size + 400 - 5)]
    assert seqs == list(range(size + 400))
    assert beside < alone * 2 + 0.5, (alone, beside)


def test_events_tail(ledger: Ledger) -> None:
    size = ledger.size()
    args = ["events", "tail", "--server", ledger.server.url, "--token", ledger.server.auditor_token]
    result = CliRunner().invoke(app, [*args, "--from", "0", "--count", str(size), "--json"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [json.loads(x)["seq"] for x in lines] == list(range(size))
    ledger.pay("alice", "bob")
    result = CliRunner().invoke(
        app, [*args, "--from", str(size - 1), "--count", "1", "--type", "transfer"]
    )
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"{size} ")
    assert " transfer " in line
    assert "member:alice→member:bob 1 CU" in line
    denied = CliRunner().invoke(
        app,
        ["events", "tail", "--server", ledger.server.url, "--count", "1"],
        env={"UBC_TOKEN": ""},
    )
    assert denied.exit_code != 0


def test_keep_alives_and_the_type_filter(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_stream, "KEEPALIVE_SECONDS", 0.3)
    timeout = httpx.Timeout(30.0, read=10.0)
    params = {"from": 0, "type": ["deposit", "apikey.grant"]}
    with (
        httpx.Client(base_url=ledger.server.url, timeout=timeout) as client,
        client.stream("GET", "/journal/stream", params=params, headers=ledger.auditor) as r,
    ):
        lines = r.iter_lines()
        assert next(lines) == "retry: 1000"
        got = take(read_events(lines), 5)
        assert [d["type"] for _, d in got] == ["deposit"] * 3 + ["apikey.grant"] * 2
        ledger.pay("alice", "bob")  # not of these types: no event, a keep-alive instead
        quiet = [line for line in itertools.takewhile(lambda x: x != ": keep-alive", lines)]
    assert not any(line.startswith(("id:", "event:", "data:")) for line in quiet), quiet


class _Dropped(httpx.SyncByteStream):
    """A body that sends ``chunks``, then loses the connection."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise httpx.ReadError("connection reset")


def test_tail_reconnects_after_the_last_event_received() -> None:
    asked: list[tuple[str | None, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append((request.headers.get("last-event-id"), request.url.params.get("from")))
        first = int(request.headers.get("last-event-id", "-1")) + 1 or int(
            request.url.params["from"]
        )
        chunks = [
            journal_stream.event(seq, "transfer", b'{"seq":%d}' % seq) for seq in (first, first + 1)
        ]
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_Dropped(chunks)
        )

    got = follow(
        "http://ledger.test", None, start=0, types=[], transport=httpx.MockTransport(answer)
    )
    seqs = [item["seq"] for item in itertools.islice(got, 6)]
    assert seqs == [0, 1, 2, 3, 4, 5]
    assert asked == [(None, "0"), ("1", None), ("3", None)]
