"""Webhooks (issue 18 item 6) and the client's event iterator (item 7), against a served
ledger with a manual clock and a receiver on loopback (a real HTTP server)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey
from typer.testing import CliRunner

from tests.conftest import LiveServer, _free_port, make_data_dir, run_server
from tests.test_journal_http import ORIGIN
from ubc.cli import app as cli
from ubc.client import UbcApiError, UbcClient, WebhookSignatureError, verify_webhook
from ubc.clock import ManualClock
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import sign_payload
from ubc.signing import encode_public_key, generate_signing_key

# --- a receiver on loopback ------------------------------------------------------------------


@dataclass
class Receiver:
    """An HTTP server that records deliveries; ``mode``: ok, fail (500), hang (no answer
    within the ledger's timeout)."""

    port: int
    secret: str = ""
    mode: str = "ok"
    received: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver.mode == "hang":
                    time.sleep(1.5)
                    return
                if receiver.mode == "fail":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"down for maintenance")
                    return
                with receiver.lock:
                    receiver.received.append((json.loads(body)["seq"], headers, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def seqs(self) -> list[int]:
        with self.lock:
            return [seq for seq, _, _ in self.received]

    def unique(self) -> list[int]:
        """What a receiver deduplicating by seq keeps, in arrival order."""
        seen: list[int] = []
        for seq in self.seqs():
            if seq not in seen:
                seen.append(seq)
        return seen


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(_free_port())
    r.start()
    yield r
    r.stop()


# --- a ledger --------------------------------------------------------------------------------


@dataclass
class Ledger:
    server: LiveServer
    http: httpx.Client
    alice: SigningKey

    @property
    def clock(self) -> ManualClock:
        return self.server.clock

    @property
    def op(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.operator_token}"}

    def envelope(self, type_: str, keys: list[SigningKey], **fields: Any) -> dict[str, Any]:
        if "from_" in fields:
            fields["from"] = fields.pop("from_")
        body = {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(self.clock.now()),  # the ledger's time
            **fields,
        }
        return sign_payload(validate_payload(type_, body), type_, keys).to_json()

    def post(self, env: dict[str, Any]) -> int:
        answer = self.http.post("/api/envelopes", json=env)
        assert answer.status_code == 201, answer.text
        seq: int = answer.json()["seq"]
        return seq

    def deposit(self, amount: int = 10) -> int:
        return self.post(
            self.envelope(
                "deposit",
                [self.server.operator_key],
                actor="operator",
                to="member:alice",
                asset="CU",
                amount=amount,
                external_ref=f"bank-{uuid.uuid4().hex}",
            )
        )

    def pay(self) -> int:
        return self.post(
            self.envelope(
                "transfer",
                [self.alice],
                actor="member:alice",
                from_="member:alice",
                to="member:bob",
                asset="CU",
                amount=1,
            )
        )

    def add(self, url: str, **body: Any) -> dict[str, Any]:
        answer = self.http.post("/api/webhooks", json={"url": url, **body}, headers=self.op)
        assert answer.status_code == 201, answer.text
        hook: dict[str, Any] = answer.json()
        return hook

    def hook(self, hook_id: str) -> dict[str, Any]:
        hooks = self.http.get("/api/webhooks", headers=self.op).json()["webhooks"]
        return next(h for h in hooks if h["id"] == hook_id)

    def log(self, hook_id: str) -> list[dict[str, Any]]:
        answer = self.http.get(
            f"/api/webhooks/{hook_id}/deliveries", params={"limit": 1000}, headers=self.op
        )
        assert answer.status_code == 200, answer.text
        deliveries: list[dict[str, Any]] = answer.json()["deliveries"]
        return deliveries


def setup_ledger(server: LiveServer, http: httpx.Client) -> Ledger:
    alice, bob = generate_signing_key(), generate_signing_key()
    ledger = Ledger(server, http, alice)
    operator = server.operator_key
    for handle, key in (("alice", alice), ("bob", bob)):
        public = encode_public_key(bytes(key.verify_key))
        ledger.post(
            ledger.envelope(
                "member.register",
                [key],
                actor=f"member:{handle}",
                handle=handle,
                public_key=public,
            )
        )
        ledger.post(
            ledger.envelope(
                "member.admit", [operator], actor="operator", handle=handle, tier="basic"
            )
        )
    ledger.deposit(1_000_000)
    return ledger


@contextlib.contextmanager
def served(db_url: str, data_dir: Path, clock: ManualClock) -> Iterator[Ledger]:
    with (
        run_server(db_url, data_dir, clock=clock, webhook_timeout_seconds=0.5) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield setup_ledger(server, http)


@pytest.fixture
def ledger(db_url: str, tmp_path: Path) -> Iterator[Ledger]:
    with served(db_url, make_data_dir(tmp_path / "data"), ManualClock()) as ledger:
        yield ledger


def wait_for(check: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def signed_correctly(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The contract's HMAC, computed here independently of ubc's code."""
    parts = dict(p.split("=", 1) for p in headers["ubc-signature"].split(","))
    mac = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), parts["v1"])


# --- deliveries ------------------------------------------------------------------------------


def test_deliveries_arrive_in_order_signed_once_each(ledger: Ledger, receiver: Receiver) -> None:
    hook = ledger.add(receiver.url)
    assert hook["secret"].startswith("whsec_")
    assert hook["created"] is True
    seqs = [ledger.pay() for _ in range(5)] + [ledger.deposit()]
    wait_for(lambda: receiver.unique() == seqs, "six deliveries")
    now = int(ledger.clock.now().timestamp())
    for seq, headers, body in receiver.received:
        assert signed_correctly(hook["secret"], headers, body)
        assert not signed_correctly("whsec_another-secret-entirely", headers, body)
        assert headers["ubc-event-id"] == str(seq)
        assert headers["content-type"] == "application/json"
        assert headers["ubc-signature"].startswith(f"t={now},v1=")
        event = json.loads(body)
        assert set(event) == {"seq", "type", "leaf_hash", "entry"}
        assert json.loads(base64.b64decode(event["entry"]))["seq"] == seq
        assert verify_webhook(body, headers, hook["secret"], now=now)["seq"] == seq
    # Exactly the stream's data for the same entries.
    with UbcClient(ledger.server.url, token=ledger.server.operator_token) as client:
        streamed = client.events(from_seq=seqs[0])
        assert [next(streamed) for _ in seqs] == [json.loads(b) for _, _, b in receiver.received]
    wait_for(lambda: ledger.hook(hook["id"])["lag"] == 0, "the cursor at the end")
    log = ledger.log(hook["id"])
    assert [d["seq"] for d in reversed(log)] == seqs
    assert {(d["attempt"], d["status_code"], d["error"]) for d in log} == {(1, 204, None)}
    metrics = ledger.http.get("/metrics").text
    assert 'ubc_webhook_deliveries_total{status="ok"}' in metrics
    assert "ubc_webhook_lag_entries" in metrics


def test_a_receiver_that_fails_times_out_then_recovers_gets_everything(
    ledger: Ledger, receiver: Receiver
) -> None:
    hook = ledger.add(receiver.url)
    receiver.mode = "fail"
    first = [ledger.pay(), ledger.pay()]
    wait_for(lambda: len(ledger.log(hook["id"])) >= 1, "a failed attempt")
    failed = ledger.log(hook["id"])[0]
    assert (failed["seq"], failed["attempt"], failed["status_code"]) == (first[0], 1, 500)
    assert "down for maintenance" in failed["error"]
    state = ledger.hook(hook["id"])
    assert state["attempts"] == 1
    assert state["cursor"] == first[0]
    # The retry is not due before the backoff (1 s at most, from the ledger's clock).
    time.sleep(0.6)
    assert len(ledger.log(hook["id"])) == 1
    receiver.mode = "hang"
    ledger.clock.advance(1.0)
    wait_for(lambda: len(ledger.log(hook["id"])) >= 2, "a second attempt")
    hung = ledger.log(hook["id"])[0]
    assert hung["status_code"] is None
    assert hung["error"].startswith("timeout")
    assert hung["attempt"] == 2
    receiver.mode = "ok"
    more = [ledger.pay(), ledger.deposit()]
    ledger.clock.advance(2.0)
    wait_for(lambda: receiver.unique() == first + more, "everything after the recovery")
    assert ledger.hook(hook["id"])["attempts"] == 0


def test_a_receiver_down_for_an_hour_receives_everything_in_order(
    ledger: Ledger, receiver: Receiver
) -> None:
    hook = ledger.add(receiver.url)
    receiver.stop()  # connection refused
    seqs = [ledger.pay() for _ in range(3)]
    waited = 0.0
    attempts = 0
    while waited < 3600:  # retries back off, from 1 s doubling (the clock moved, no sleep)
        wait_for(lambda n=attempts: len(ledger.log(hook["id"])) > n, "the next attempt")
        attempts = len(ledger.log(hook["id"]))
        step = min(2.0**attempts, 3600.0)  # at least the backoff after that many
        ledger.clock.advance(step)
        waited += step
    log = ledger.log(hook["id"])
    assert {d["seq"] for d in log} == {seqs[0]}  # in order: nothing passes the first
    assert all(d["error"].startswith("unreachable") for d in log)
    gaps = [d["attempted_at"] for d in reversed(log)]
    assert len(gaps) == len(set(gaps))
    assert ledger.hook(hook["id"])["status"] == "active"
    seqs += [ledger.pay(), ledger.deposit()]  # written while it is down
    receiver.start()
    ledger.clock.advance(3600)  # the longest backoff
    wait_for(lambda: receiver.unique() == seqs, "everything, in order")
    assert receiver.seqs() == seqs  # nothing twice either


def test_a_backlog_of_thousands_is_delivered_in_order_once_each_after_recovery(
    ledger: Ledger, receiver: Receiver
) -> None:
    hook = ledger.add(receiver.url, types=["transfer"])
    receiver.stop()  # connection refused
    seqs = [ledger.pay()]
    wait_for(lambda: len(ledger.log(hook["id"])) >= 1, "a refused attempt")
    for _ in range(3):  # 3,000 more transfers (and a deposit between, not delivered)
        envelopes = [
            ledger.envelope(
                "transfer",
                [ledger.alice],
                actor="member:alice",
                from_="member:alice",
                to="member:bob",
                asset="CU",
                amount=1,
            )
            for _ in range(1000)
        ]
        answer = ledger.http.post(
            "/api/envelopes/batch", json={"atomic": True, "envelopes": envelopes}
        )
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert {r["status"] for r in results} == {201}
        seqs += [r["body"]["seq"] for r in results]
        ledger.deposit()
    assert len(seqs) == 3001
    receiver.start()
    ledger.clock.advance(3600)  # the longest backoff
    wait_for(lambda: len(receiver.seqs()) >= len(seqs), "the backlog", seconds=120)
    wait_for(lambda: ledger.hook(hook["id"])["lag"] == 0, "the cursor at the end")
    assert receiver.seqs() == seqs  # in journal order, each once
    # The delivery log has every attempt: the refused one(s) of the first entry, then one
    # 204 per entry, in order (newest first, a page of at most 1,000 at a time).
    log: list[dict[str, Any]] = []
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if before is not None:
            params["before"] = before
        page = ledger.http.get(
            f"/api/webhooks/{hook['id']}/deliveries", params=params, headers=ledger.op
        ).json()
        log += page["deliveries"]
        before = page["next_before"]
        if before is None:
            break
    delivered = [d["seq"] for d in reversed(log) if d["status_code"] == 204]
    assert delivered == seqs
    refused = [d for d in log if d["status_code"] != 204]
    assert refused
    assert {d["seq"] for d in refused} == {seqs[0]}
    assert all(d["error"].startswith("unreachable") for d in refused)


def test_an_endpoint_failing_for_a_day_is_marked_failing_and_a_replay_resumes_it(
    ledger: Ledger, receiver: Receiver
) -> None:
    hook = ledger.add(receiver.url)
    receiver.mode = "fail"
    seq = ledger.pay()
    wait_for(lambda: len(ledger.log(hook["id"])) == 1, "an attempt")
    for _ in range(30):  # a day and more, an hour at a time
        if ledger.hook(hook["id"])["status"] == "failing":
            break
        ledger.clock.advance(3600)
        count = len(ledger.log(hook["id"]))
        wait_for(lambda: len(ledger.log(hook["id"])) > count, "a retry")  # noqa: B023
    state = ledger.hook(hook["id"])
    assert state["status"] == "failing"
    assert state["cursor"] == seq
    assert len(ledger.log(hook["id"])) >= 24
    receiver.mode = "ok"
    ledger.clock.advance(3600)
    time.sleep(0.6)
    assert receiver.seqs() == []  # failing: left alone
    answer = ledger.http.post(f"/api/webhooks/{hook['id']}/replay", json={}, headers=ledger.op)
    assert answer.status_code == 200
    assert answer.json()["status"] == "active"
    wait_for(lambda: receiver.seqs() == [seq], "the delivery after the replay")


def test_one_failing_endpoint_does_not_delay_another(ledger: Ledger, receiver: Receiver) -> None:
    hanging = Receiver(_free_port(), mode="hang")  # each attempt ends at the 0.5 s timeout
    hanging.start()
    try:
        stuck = ledger.add(hanging.url)
        ledger.add(receiver.url)
        seqs: list[int] = []
        took: list[float] = []
        for _ in range(4):  # the stuck endpoint retries all along (the clock moves on)
            ledger.clock.advance(120)
            seqs.append(ledger.pay())
            began = time.monotonic()
            wait_for(lambda: receiver.unique() == seqs, "the healthy endpoint's delivery")  # noqa: B023
            took.append(time.monotonic() - began)
        assert sum(took) < 4 * 0.5  # never queued behind the other's 0.5 s timeouts
        assert receiver.seqs() == seqs
        ledger.clock.advance(120)
        wait_for(lambda: len(ledger.log(stuck["id"])) >= 2, "the stuck endpoint's retry")
        assert ledger.hook(stuck["id"])["cursor"] == seqs[0]
    finally:
        hanging.stop()


def test_replay_from_a_seq_delivers_again(ledger: Ledger, receiver: Receiver) -> None:
    hook = ledger.add(receiver.url)
    seqs = [ledger.pay() for _ in range(4)]
    wait_for(lambda: receiver.seqs() == seqs, "the deliveries")
    result = CliRunner().invoke(
        cli,
        ["webhooks", "replay", hook["id"], "--from", str(seqs[1])],
        env={"UBC_SERVER": ledger.server.url, "UBC_TOKEN": ledger.server.operator_token},
    )
    assert result.exit_code == 0, result.output
    assert f"delivers from seq {seqs[1]}" in result.output
    wait_for(lambda: receiver.seqs() == seqs + seqs[1:], "the replayed deliveries")
    assert receiver.unique() == seqs  # a receiver deduplicating by seq sees each once
    too_far = ledger.http.post(
        f"/api/webhooks/{hook['id']}/replay", json={"from": 10**6}, headers=ledger.op
    )
    assert too_far.status_code == 400
    assert "beyond the journal" in too_far.json()["error"]["message"]


def test_a_type_filter(ledger: Ledger, receiver: Receiver) -> None:
    hook = ledger.add(receiver.url, types=["deposit"])
    assert hook["types"] == ["deposit"]
    written = [ledger.pay(), ledger.deposit(), ledger.pay(), ledger.pay(), ledger.deposit()]
    deposits = [written[1], written[4]]
    wait_for(lambda: ledger.hook(hook["id"])["lag"] == 0, "the cursor past every entry")
    assert receiver.seqs() == deposits
    assert all(json.loads(b)["type"] == "deposit" for _, _, b in receiver.received)


def test_the_api_and_the_cli_refuse_bad_inputs_and_are_idempotent(
    ledger: Ledger, receiver: Receiver
) -> None:
    def add(**body: Any) -> httpx.Response:
        return ledger.http.post("/api/webhooks", json=body, headers=ledger.op)

    for url in ("ftp://example.org/x", "example.org/hook", "http://", "http://u:p@h/x", "x" * 3000):
        answer = add(url=url)
        assert answer.status_code == 400, (url, answer.text)
        assert answer.json()["error"]["type"] == "bad_request"
    answer = add(url=receiver.url, types=["transfer", "no.such.type"])
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "unknown payload type 'no.such.type'"
    assert "transfer" in answer.json()["error"]["detail"]["known"]
    assert add(url=receiver.url, secret="short").status_code == 400
    assert add(url=receiver.url, **{"from": 10**6}).status_code == 400
    assert add(url=receiver.url, colour="blue").status_code == 422
    # Nothing was registered by any of these.
    assert ledger.http.get("/api/webhooks", headers=ledger.op).json() == {"webhooks": []}
    # Operator only.
    auditor = {"Authorization": f"Bearer {ledger.server.auditor_token}"}
    assert ledger.http.get("/api/webhooks", headers=auditor).status_code == 403
    assert ledger.http.get("/api/webhooks").status_code == 401
    # Idempotent: the same URL and types again is the same endpoint, without its secret.
    first = add(url=receiver.url, types=["transfer"], secret="s" * 32)
    assert first.status_code == 201
    assert first.json()["secret"] == "s" * 32
    again = add(url=receiver.url, types=["transfer"])
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["secret"] is None
    assert add(url=receiver.url, types=["deposit"]).status_code == 409
    gone = ledger.http.delete("/api/webhooks/wh_0000000000000000", headers=ledger.op)
    assert gone.status_code == 404
    assert gone.json()["error"]["type"] == "not_found"
    # The CLI says the same in one line.
    env = {"UBC_SERVER": ledger.server.url, "UBC_TOKEN": ledger.server.operator_token}
    runner = CliRunner()
    result = runner.invoke(cli, ["webhooks", "add", "ftp://example.org/x"], env=env)
    assert result.exit_code == 1
    assert "http:// or https://" in result.output
    result = runner.invoke(cli, ["webhooks", "add", receiver.url, "--type", "bogus"], env=env)
    assert result.exit_code == 1
    assert "unknown payload type 'bogus'" in result.output
    other = f"http://127.0.0.1:{receiver.port}/other"
    result = runner.invoke(cli, ["webhooks", "add", other, "--type", "deposit"], env=env)
    assert result.exit_code == 0
    assert "Signing secret (shown once" in result.output
    listed = runner.invoke(cli, ["webhooks", "list"], env=env)
    assert listed.exit_code == 0
    assert other in listed.output
    assert "types: deposit" in listed.output
    hook_id = listed.output.split()[0]
    result = runner.invoke(cli, ["webhooks", "deliveries", first.json()["id"]], env=env)
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli, ["webhooks", "remove", hook_id], env=env).exit_code == 0
    result = runner.invoke(cli, ["webhooks", "remove", hook_id], env=env)
    assert result.exit_code == 1
    assert "no webhook" in result.output


def test_verify_webhook_refuses_what_is_not_signed_right() -> None:
    body = b'{"seq":7,"type":"transfer","leaf_hash":"x","entry":"e30="}'
    secret = "whsec_test-secret-of-enough-length"
    t = 1_800_000_000
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    headers = {"Ubc-Signature": f"t={t},v1={mac}", "Ubc-Event-Id": "7"}
    assert verify_webhook(body, headers, secret, now=t + 10)["seq"] == 7
    bad = [
        (body + b" ", headers, secret, t),
        (body, headers, "whsec_another-secret-of-length", t),
        (body, headers, secret, t + 301),
        (body, {"ubc-signature": f"t={t}"}, secret, t),
        (body, {}, secret, t),
        (body, {**headers, "Ubc-Event-Id": "8"}, secret, t),
    ]
    for raw, hdrs, key, now in bad:
        with pytest.raises(WebhookSignatureError):
            verify_webhook(raw, hdrs, key, now=now)
    # Several v1 signatures (a secret being rotated): any one matching is enough.
    both = {"ubc-signature": f"t={t},v1={'0' * 64},v1={mac}"}
    assert verify_webhook(body, both, secret, now=t)["seq"] == 7


@pytest.mark.postgres
def test_only_one_delivery_worker_across_two_app_instances(
    db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("one database shared by two servers: PostgreSQL")
    data = make_data_dir(tmp_path / "data")
    clock = ManualClock()
    with (
        served(db_url, data, clock) as one,
        run_server(db_url, data, clock=clock, webhook_timeout_seconds=0.5) as two,
    ):
        one.add(receiver.url)
        seqs = [one.pay() for _ in range(20)]
        wait_for(lambda: receiver.unique() == seqs, "the deliveries")
        time.sleep(1.0)  # time for a second worker, were there one, to deliver again
        assert receiver.seqs() == seqs
        leaders = [one.server.app.state.webhooks.leading, two.app.state.webhooks.leading]
        assert sorted(leaders) == [False, True]


# --- the client's iterator over the stream ---------------------------------------------------


class _Dropping(httpx.BaseTransport):
    """The real network, but every stream's body is cut after ``after`` events."""

    def __init__(self, after: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.after = after
        self.opened: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path != "/journal/stream":
            return response
        self.opened.append(request.headers.get("last-event-id"))
        after = self.after

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                events = 0
                for chunk in response.stream:  # type: ignore[union-attr]
                    yield chunk
                    events += chunk.count(b"\n\n")
                    if events > after:
                        response.close()
                        raise httpx.ReadError("connection reset (test)")

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut())


def test_client_events_exactly_once_in_order_across_a_reconnect(ledger: Ledger) -> None:
    start = ledger.pay()
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        while not stop.is_set() and len(written) < 60:
            written.append(ledger.pay())

    transport = _Dropping(after=7)
    writer = threading.Thread(target=write)
    with UbcClient(
        ledger.server.url, token=ledger.server.operator_token, transport=transport
    ) as client:
        events = client.events(from_seq=start, types=["transfer"], backoff=[0.05])
        writer.start()
        try:
            got = [next(events)["seq"] for _ in range(61)]
        finally:
            stop.set()
            writer.join()
    assert got == [start, *written]
    assert len(transport.opened) >= 2  # it reconnected, with Last-Event-ID
    assert transport.opened[0] is None
    assert all(transport.opened[1:])


def test_client_events_refused_raises(ledger: Ledger) -> None:
    with UbcClient(ledger.server.url, token="not-a-token") as client:
        with pytest.raises(UbcApiError) as refused:
            next(client.events(from_seq=0))
    assert refused.value.status == 401
