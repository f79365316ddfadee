"""Structured logs (issue 17, item 2): request ids, access and usage lines in JSON, and
no secret in the log of a full run."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

import ubc.app
from tests.conftest import _free_port, make_data_dir
from tests.test_gateway import Env, env  # noqa: F401  # the served ledger and upstream
from ubc import logs
from ubc.audit.source import from_database

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class Captured:
    """The JSON log lines of ubc's and uvicorn's loggers during a test."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]  # each one parses

    def wait_for(self, **fields: Any) -> dict[str, Any]:
        """The first line with ``fields``, waiting for it (access lines follow answers)."""
        deadline = time.monotonic() + 10
        while True:
            for line in self.lines():
                if all(line.get(k) == v for k, v in fields.items()):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {fields}:\n{self.text}")
            time.sleep(0.02)


@pytest.fixture
def captured() -> Iterator[Captured]:
    made = Captured()
    handler = logging.StreamHandler(made.stream)
    handler.setFormatter(logs.JsonFormatter())
    names = ("ubc", "uvicorn", *logs.PER_REQUEST_LOGGERS)
    before = {name: logging.getLogger(name).level for name in names}
    for name in ("ubc", "uvicorn"):
        logging.getLogger(name).addHandler(handler)
    for name in ("ubc", *logs.PER_REQUEST_LOGGERS):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        yield made
    finally:
        for name in ("ubc", "uvicorn"):
            logging.getLogger(name).removeHandler(handler)
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def _seed(key: SigningKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def _signatures(db_url: str) -> list[str]:
    found = []
    for _, raw in from_database(db_url).entries:
        entry = json.loads(raw)
        found += [s["sig"] for s in entry["envelope"]["signatures"]]
    return found


def test_request_ids_access_and_usage_lines_and_no_secret_in_the_log(
    env: Env,  # noqa: F811
    captured: Captured,
) -> None:
    member, secret = env.member("alice", 10_000)
    server = env.server
    with httpx.Client(base_url=server.url, timeout=20) as http:
        # Generated, echoed, and a header that is not sane replaced.
        answer = http.get("/healthz")
        generated = answer.headers["x-request-id"]
        assert UUID.match(generated)
        assert http.get("/healthz", headers={"X-Request-Id": "trace-1"}).headers[
            "x-request-id"
        ] == ("trace-1")
        for insane in ("x" * 129, "tab\there"):
            replaced = http.get("/healthz", headers={"X-Request-Id": insane})
            assert UUID.match(replaced.headers["x-request-id"])
        # Errors carry it too; a query string is never logged.
        missing = http.get(
            "/api/nothing-here?token=" + server.operator_token, headers={"X-Request-Id": "e-404"}
        )
        assert missing.status_code == 404
        assert missing.headers["x-request-id"] == "e-404"
        # An operator read: its actor.
        read = http.get(
            "/api/accounts/member:alice",
            headers={"Authorization": f"Bearer {server.operator_token}", "X-Request-Id": "r-op"},
        )
        assert read.status_code == 200

        # A model call with the client's id: the upstream gets it, the usage line names it.
        chat = {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"Authorization": f"Bearer {secret}"}
        called = http.post(
            "/v1/chat/completions", json=chat, headers={**auth, "X-Request-Id": "call-given"}
        )
        assert called.status_code == 200, called.text
        assert called.headers["x-request-id"] == "call-given"
        assert env.upstream.stats().last_request_headers["x-request-id"] == "call-given"
        # Without one: the generated id is also the call's (its usage entry's request_id).
        streamed = http.post("/v1/chat/completions", json={**chat, "stream": True}, headers=auth)
        assert streamed.status_code == 200
        call_id = streamed.headers["x-request-id"]
        assert UUID.match(call_id)
        assert env.upstream.stats().last_request_headers["x-request-id"] == call_id
        # A refused call (unknown model) answers it too.
        refused = http.post("/v1/chat/completions", json={**chat, "model": "nope"}, headers=auth)
        assert refused.status_code == 404
        assert UUID.match(refused.headers["x-request-id"])
    env.settled()

    access = captured.wait_for(logger="ubc.access", request_id=generated)
    assert access["method"] == "GET"
    assert access["path"] == "/healthz"
    assert access["status"] == 200
    assert access["level"] == "INFO"
    assert isinstance(access["latency_ms"], float)
    assert access["ts"].endswith("Z")
    assert "actor" not in access
    assert captured.wait_for(logger="ubc.access", request_id="e-404")["path"] == "/api/nothing-here"
    given = captured.wait_for(logger="ubc.access", request_id="call-given")
    assert (given["status"], given["actor"]) == (200, "member:alice")
    assert captured.wait_for(logger="ubc.access", request_id=call_id)["actor"] == "member:alice"
    usage = captured.wait_for(logger="ubc.usage", request_id="call-given")
    assert UUID.match(usage["call"])
    assert usage["call"] != "call-given"
    assert usage["account"] == "member:alice"
    streamed_usage = captured.wait_for(logger="ubc.usage", request_id=call_id)
    assert streamed_usage["call"] == call_id
    journaled = [json.loads(raw)["envelope"] for _, raw in from_database(server.db_url).entries]
    usage_ids = {
        json.loads(base64.b64decode(e["payload"]))["request_id"]
        for e in journaled
        if e["payloadType"] == "application/vnd.ubc.usage+json"
    }
    assert call_id in usage_ids

    # Every line parses (lines() does) and none carries a secret used in the run.
    lines = captured.lines()
    assert len(lines) >= 9
    text = captured.text
    secrets = {
        "api key": secret,
        "operator token": server.operator_token,
        "auditor token": server.auditor_token,
        "operator key": _seed(server.operator_key),
        "ledger key": _seed(server.ledger_key),
        "member key": _seed(member.key),
    }
    signatures = _signatures(server.db_url)
    assert len(signatures) >= 5
    secrets.update({f"signature {i}": sig for i, sig in enumerate(signatures)})
    secrets["upstream key"] = "sk-upstream"
    leaked = [name for name, value in secrets.items() if value in text]
    assert not leaked, leaked


def test_text_lines_stay_one_line() -> None:
    record = logging.LogRecord("ubc.access", logging.INFO, "", 0, "GET %s", ("/a\nb",), None)
    record.fields = {"path": "/a\nb c", "status": 200}
    line = logs.TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith('path="/a\\nb c" status=200')


def test_ubc_serve_log_format_json(tmp_path: Path) -> None:
    """``ubc serve --log-format json --access-log``: uvicorn's and ubc's lines, all JSON."""
    data = make_data_dir(tmp_path / "data")
    port = _free_port()
    environ = {
        **os.environ,
        "UBC_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "UBC_DATA_DIR": str(data),
        "UBC_ORIGIN": "test.ubc/logs",
    }
    command = [sys.executable, "-c", "from ubc.cli import main; main()", "serve"]
    command += ["--port", str(port), "--log-format", "json", "--access-log"]
    process = subprocess.Popen(
        command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/healthz?k=v", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        request_id = answer.headers["x-request-id"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert {"uvicorn.error", "ubc.access"} <= {line["logger"] for line in lines}
    [access] = [line for line in lines if line["logger"] == "ubc.access"]
    assert access["request_id"] == request_id
    assert access["path"] == "/healthz"
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert uuid.UUID(request_id)


def test_generated_ids_are_canonical_uuid4() -> None:
    for _ in range(1000):
        made = logs.new_request_id()
        assert str(uuid.UUID(made)) == made
        assert uuid.UUID(made).version == 4


def test_background_rounds_that_did_something_are_logged(
    captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line per round of the hold sweeper and the epoch task that did something."""

    async def rounds() -> None:
        stop = asyncio.Event()
        sweeps = iter([(0, 0, 0), (2, 1, 3)])
        steps = iter([[], ["fix", "allocate"]])

        def sweep(_app: object) -> tuple[int, int, int]:
            return next(sweeps, (0, 0, 0))

        def advance(_app: object) -> list[str]:
            found = next(steps, None)
            if found is None:
                stop.set()
                return []
            return found

        monkeypatch.setattr(ubc.app, "sweep_once", sweep)
        monkeypatch.setattr(ubc.app, "_advance_once", advance)
        await asyncio.gather(
            ubc.app._sweep_holds(None, 0.01, stop),  # type: ignore[arg-type]
            ubc.app._advance_epochs(None, stop),  # type: ignore[arg-type]
        )

    asyncio.run(rounds())
    jobs = [line for line in captured.lines() if "job" in line]
    assert [line["job"] for line in jobs].count("hold sweep") == 1
    [sweep] = [line for line in jobs if line["job"] == "hold sweep"]
    assert (sweep["calls"], sweep["holds"], sweep["offers"]) == (2, 1, 3)
    assert sweep["msg"].startswith("hold sweep: calls 2, holds 1, offers 3 in ")
    [epoch] = [line for line in jobs if line["job"] == "epoch step"]
    assert epoch["steps"] == ["fix", "allocate"]
    assert isinstance(epoch["ms"], float)
