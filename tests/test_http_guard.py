"""Issue 12's HTTP limits and headers: body size while reading, body read timeout, JSON
depth, security headers, local Swagger UI, and files created 0600.

The server runs for real (uvicorn in a thread of this process), so its memory is this
process's, read from ``/proc/self/status``; large bodies are streamed by the test, never
built in memory.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.responses import PlainTextResponse
from typer.testing import CliRunner

from tests.conftest import LiveServer, make_data_dir, run_server
from ubc.app import create_app
from ubc.cli import app as cli
from ubc.config import Settings
from ubc.db import make_engine
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import sign_payload
from ubc.errors import BadRequest
from ubc.files import create_private_sqlite, open_private
from ubc.http_guard import (
    API_CSP,
    DOCS_CSP,
    SecurityHeaders,
    json_depth_exceeds,
    loads_limited,
)

MiB = 1024 * 1024
LIMIT = 16 * MiB  # Settings.max_body_bytes' default
JSON_ROUTES = ["/api/envelopes", "/api/envelopes/batch", "/api/withdrawals"]
OPENAI_ROUTES = ["/v1/embeddings", "/v1/chat/completions"]


@pytest.fixture
def server(sqlite_template: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """A served ledger on SQLite: the limits under test do not depend on the engine."""
    with _serve(sqlite_template, tmp_path) as live:
        yield live


def _serve(template: Path, tmp_path: Path, **overrides: object) -> Any:
    path = tmp_path / "ubc.db"
    shutil.copyfile(template, path)
    return run_server(f"sqlite:///{path}", make_data_dir(tmp_path / "data"), **overrides)


def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _raw_request(url: str, head: bytes, body: bytes = b"", *, wait: float = 10) -> bytes:
    """Send ``head`` (and ``body``) on a fresh connection; everything the server answers
    until it closes the connection or ``wait`` seconds pass."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        received = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        return received


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _is_ubc_error(body: Any, type_: str) -> bool:
    error = body["error"]
    return set(error) == {"type", "message", "detail"} and error["type"] == type_


def _is_openai_error(body: Any, code: str) -> bool:
    error = body["error"]
    return (
        set(error) == {"message", "type", "param", "code"}
        and error["type"] == "invalid_request_error"
        and error["param"] is None
        and error["code"] == code
    )


# --- 1. body size, while reading ---------------------------------------------------------


def test_a_streamed_body_over_the_limit_is_refused_early_with_bounded_memory(
    server: LiveServer,
) -> None:
    sent = 0

    def body() -> Iterator[bytes]:  # 1 GiB of JSON-looking bytes, 1 MiB at a time
        nonlocal sent
        chunk = b" " * MiB
        yield b'{"envelopes": ['
        for _ in range(1024):
            sent += len(chunk)
            yield chunk

    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.get("/healthz")  # the server's own start-up allocations are done
        before = _rss_kib()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            peak_field = "VmHWM"
        except OSError:
            peak_field = "VmRSS"
        response = client.post("/api/envelopes/batch", content=body())
        grown_mib = (_rss_kib(peak_field) - before) / 1024
    assert response.status_code == 413, response.text
    assert _is_ubc_error(response.json(), "payload_too_large")
    assert response.json()["error"]["detail"] == {"max_body_bytes": LIMIT}
    assert sent < 128 * MiB, f"the client could send {sent / MiB:.0f} MiB"
    assert grown_mib < 100, f"the server grew by {grown_mib:.0f} MiB"


@pytest.mark.parametrize("path", ["/api/envelopes", "/v1/embeddings", "/nowhere"])
def test_a_content_length_over_the_limit_is_refused_before_the_body(
    server: LiveServer, path: str
) -> None:
    started = time.monotonic()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {LIMIT + 1}\r\n\r\n"
    ).encode()
    status, headers, body = _split(_raw_request(server.url, head, b"{"))
    assert time.monotonic() - started < 5  # answered without waiting for 16 MiB
    assert status == 413
    assert headers["connection"] == "close"
    if path.startswith("/v1/"):
        assert _is_openai_error(json.loads(body), "request_too_large")
    else:
        assert _is_ubc_error(json.loads(body), "payload_too_large")


def test_a_body_within_the_limit_reaches_the_route_whole(server: LiveServer) -> None:
    """Chunked, unknown length: read by the guard, replayed to the route as sent."""
    key = server.operator_key
    payload = {
        "ledger": server.settings.origin,
        "id": str(uuid.uuid4()),
        "created_at": format_timestamp(datetime.now(UTC)),
        "actor": "operator",
        "handle": "alice",
        "tier": "basic",
    }
    envelope = sign_payload(validate_payload("member.admit", payload), "member.admit", [key])
    raw = json.dumps(envelope.to_json()).encode()
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    with httpx.Client(base_url=server.url) as client:
        answer = client.post("/api/envelopes", content=iter(pieces))
        # Signature verified over the exact bytes and the rules applied: the operator may
        # not admit a member who never registered.
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["message"] == "no member alice"
        # A body just under the limit is not refused by the guard (the route answers).
        big = b'{"atomic": false, "envelopes": []}' + b" " * (LIMIT - 64)
        assert client.post("/api/envelopes/batch", content=big).status_code != 413


def test_a_body_that_does_not_arrive_in_time_answers_408(
    sqlite_template: Path, tmp_path: Path
) -> None:
    with _serve(sqlite_template, tmp_path, timeout_request_seconds=1.0) as live:
        for path, openai in (("/api/envelopes", False), ("/v1/embeddings", True)):
            head = (
                f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n"
            ).encode()
            started = time.monotonic()
            status, headers, body = _split(_raw_request(live.url, head, b'{"a": ', wait=10))
            waited = time.monotonic() - started
            assert status == 408
            assert 0.9 < waited < 5, waited  # answered, and the connection closed, in time
            assert headers["connection"] == "close"
            if openai:
                assert _is_openai_error(json.loads(body), "request_timeout")
            else:
                assert _is_ubc_error(json.loads(body), "request_timeout")


def test_bodies_held_at_once_are_bounded_per_worker(sqlite_template: Path, tmp_path: Path) -> None:
    """Many connections each within the limit cannot add up: past 8 bodies of the largest
    size being read at once, 503 with Retry-After; the budget comes back when they end."""
    limit = 64 * 1024
    with _serve(sqlite_template, tmp_path, max_body_bytes=limit) as live:
        host, port = live.url.removeprefix("http://").split(":")
        head = (
            "POST /api/envelopes HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit}\r\n\r\n"
        ).encode()
        sockets = [socket.create_connection((host, int(port)), timeout=5) for _ in range(12)]
        try:
            for sock in sockets:
                sock.sendall(head + b" " * (limit - 1))  # all but the last byte
            busy = []
            for sock in sockets:
                sock.settimeout(0.5)
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue  # still being read: within the budget
                busy.append(_split(answer))
            assert 1 <= len(busy) <= 4, busy
            for status, headers, body in busy:
                assert status == 503
                assert headers["retry-after"] == "1"
                assert _is_ubc_error(json.loads(body), "unavailable")
        finally:
            for sock in sockets:
                sock.close()
        time.sleep(0.5)  # the server sees the disconnects and gives the budget back
        with httpx.Client(base_url=live.url) as client:
            for _ in range(10):
                answer = client.post("/api/envelopes", content=b" " * (limit - 1))
                assert answer.status_code == 400, answer.text  # the route's "not JSON"


# --- 2. JSON depth -----------------------------------------------------------------------


@pytest.mark.parametrize("path", JSON_ROUTES + OPENAI_ROUTES)
def test_deeply_nested_json_is_a_400_in_the_route_s_shape(server: LiveServer, path: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for deep in (b"[" * 200_000, b'{"a":' * 100_000, b"[" * 65 + b"]" * 65):
            answer = client.post(path, content=deep, headers={"content-type": "application/json"})
            assert answer.status_code == 400, answer.text
            if path.startswith("/v1/"):
                assert _is_openai_error(answer.json(), "json_too_deep")
            else:
                assert _is_ubc_error(answer.json(), "bad_request")
                assert "64 levels" in answer.json()["error"]["message"]


def test_json_depth_is_measured_outside_strings_and_without_recursion() -> None:
    assert not json_depth_exceeds(b"[" * 64 + b"]" * 64, 64)
    assert json_depth_exceeds(b"[" * 65 + b"]" * 65, 64)
    assert json_depth_exceeds(b"[" * 10_000_000, 64)
    assert json_depth_exceeds(b'{"a":' * 65, 64)  # invalid JSON still counted
    assert not json_depth_exceeds(json.dumps({"memo": "[{" * 10_000}).encode(), 64)
    assert not json_depth_exceeds(json.dumps(['\\"[[[[' * 1000]).encode(), 64)
    assert json_depth_exceeds(("[" * 65).encode("utf-16"), 64)  # json.loads reads UTF-16
    flat = b"[" + b"[]," * 1_000_000 + b"[]]"
    assert not json_depth_exceeds(flat, 64)
    # An unterminated string of escaped quotes is still linear (it was quadratic).
    started = time.monotonic()
    assert not json_depth_exceeds(b'["' + b'\\"[' * 2_000_000, 64)
    assert time.monotonic() - started < 2
    assert loads_limited(b'{"a": [1, {"b": []}]}', 64) == {"a": [1, {"b": []}]}
    with pytest.raises(BadRequest, match="64 levels"):
        loads_limited(b"[" * 200_000, 64)


# --- 3. security headers -----------------------------------------------------------------


def _assert_secured(response: httpx.Response, csp: str) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["content-security-policy"] == csp


def test_every_response_carries_the_security_headers(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        _assert_secured(client.get("/api/ledger"), API_CSP)  # a JSON route
        missing = client.get("/api/members/nobody-here")  # an error of the routes
        assert missing.status_code in (401, 404)
        _assert_secured(missing, API_CSP)
        _assert_secured(client.get("/no/such/route"), API_CSP)  # Starlette's 404
        _assert_secured(client.get("/api/ledger%00"), API_CSP)  # RefuseNul's 400
        too_deep = client.post("/v1/embeddings", content=b"[" * 100)  # the guard's 400
        _assert_secured(too_deep, API_CSP)
        _assert_secured(client.get("/docs"), DOCS_CSP)
        _assert_secured(client.get("/docs/static/swagger-ui.css"), DOCS_CSP)


def _get(app: Any, path: str) -> httpx.Response:
    """``GET path`` of an ASGI app in process (no lifespan), exceptions answered as 500."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(get())


def test_an_unhandled_error_s_500_carries_them_too(tmp_path: Path) -> None:
    """Starlette answers those from its outermost middleware: the headers wrap it too."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", data_dir=tmp_path)
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    answer = _get(app, "/boom")
    assert answer.status_code == 500
    _assert_secured(answer, API_CSP)


def test_a_server_header_is_dropped_and_the_app_s_own_headers_kept() -> None:
    inner = PlainTextResponse("x", headers={"server": "uvicorn", "x-frame-options": "SAMEORIGIN"})
    answer = _get(SecurityHeaders(inner), "/")
    assert "server" not in answer.headers
    assert answer.headers["x-frame-options"] == "SAMEORIGIN"
    assert answer.headers["x-content-type-options"] == "nosniff"


# --- 4. Swagger UI from the package ------------------------------------------------------


def test_docs_load_only_local_assets_and_no_inline_script(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        text = page.text
        urls = re.findall(r'(?:src|href)="([^"]*)"', text)
        assert urls, text
        assert "http" not in text
        assert "//" not in "".join(urls)
        assert re.search(r"<script(?![^>]*\ssrc=)[^>]*>", text) is None  # no inline script
        assert "unsafe-eval" not in page.headers["content-security-policy"]
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 100, url
        init = client.get("/docs/static/swagger-ui-init.js").text
        assert "SwaggerUIBundle(" in init
        assert "http" not in init
        assert 'data-openapi-url="/openapi.json"' in text
        assert client.get("/openapi.json").status_code == 200
        redirect = client.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200
        assert "<script>" not in redirect.text
        assert "swaggerUIRedirectOauth2" in client.get("/docs/static/oauth2-redirect.js").text
        # Only the files the page needs; not the package's demo index.html.
        assert client.get("/docs/static/index.html").status_code == 404
        assert client.get("/docs/static/..%2Fconfig.py").status_code == 404
        assert client.get("/redoc").status_code == 404
        schema = client.get("/openapi.json").json()
        assert not any(p.startswith("/docs") for p in schema["paths"])


# --- 5. files created 0600 ---------------------------------------------------------------


@pytest.fixture
def wide_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_are_0600_whatever_the_umask(tmp_path: Path, wide_umask: None) -> None:
    new = tmp_path / "new.txt"
    with open_private(new) as f:
        f.write("secret")
    assert _mode(new) == 0o600
    assert new.read_text() == "secret"
    existing = tmp_path / "existing.txt"
    existing.write_text("old, longer")
    existing.chmod(0o644)
    with open_private(existing) as f:
        f.write("new")
    assert _mode(existing) == 0o600
    assert existing.read_text() == "new"
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    create_private_sqlite(url)
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        wal = tmp_path / "ledger.db-wal"
        shm = tmp_path / "ledger.db-shm"
        assert wal.exists()
        assert shm.exists()
        # SQLite gives its WAL and shared-memory files the database file's mode.
        assert _mode(wal) == 0o600
        assert _mode(shm) == 0o600
    engine.dispose()
    assert _mode(tmp_path / "ledger.db") == 0o600
    create_private_sqlite("sqlite://")  # in memory: nothing to create
    create_private_sqlite("postgresql+psycopg://u@h/db")


def test_a_new_sqlite_database_is_created_0600(tmp_path: Path, wide_umask: None) -> None:
    """``ubc.db.make_engine`` creates the file private before SQLite opens it."""
    path = tmp_path / "ubc.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")
    engine.dispose()
    assert _mode(path) == 0o600


def test_an_audit_export_is_0600(server: LiveServer, tmp_path: Path, wide_umask: None) -> None:
    out = tmp_path / "export.jsonl"
    result = CliRunner().invoke(
        cli, ["audit", "export", server.url, "-o", str(out), "--token", server.auditor_token]
    )
    assert result.exit_code == 0, result.output
    assert _mode(out) == 0o600
    header = json.loads(out.read_text().splitlines()[0])
    assert header["origin"] == server.settings.origin
    assert base64.b64decode(json.loads(out.read_text().splitlines()[1])["entry"])
