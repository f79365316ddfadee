"""Connection limits of ``ubc serve`` over real sockets (issue 12): idle, slow and oversized
request heads are cut off, a body that outlives its answer too, and connections above the
cap answer 503 in the documented shape.

The server runs exactly the configuration ``ubc serve`` builds (``uvicorn_config``), in a
thread, with timeouts of a fraction of a second: these tests use real time because the
timers are the kernel's and the event loop's.
"""

from __future__ import annotations

import contextlib
import json
import select
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import _free_port, make_data_dir, serve_in_thread
from ubc import serving
from ubc.app import create_app
from ubc.cli import app as cli
from ubc.config import Settings, get_settings
from ubc.serving import PROTOCOL, ServerConfig, uvicorn_config

KEEP_ALIVE = 0.5
REQUEST = 1.0
GET = b"GET /healthz HTTP/1.1\r\nHost: ubc\r\n\r\n"


@contextlib.contextmanager
def serve(settings: Settings, app: Any = None, **options: Any) -> Iterator[tuple[str, int]]:
    """``ubc serve``'s uvicorn configuration, on loopback in a thread."""
    port = _free_port()
    config = uvicorn_config(
        settings,
        app=app or create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        **options,
    )
    with serve_in_thread(config):
        yield ("127.0.0.1", port)


def make_settings(tmp_path: Path, sqlite_template: Path, **overrides: Any) -> Settings:
    database = tmp_path / "ubc.db"
    shutil.copyfile(sqlite_template, database)
    return Settings(
        database_url=f"sqlite:///{database}",
        data_dir=make_data_dir(tmp_path / "data"),
        origin="test.ubc/connections",
        **overrides,
    )


@pytest.fixture
def address(tmp_path: Path, sqlite_template: Path) -> Iterator[tuple[str, int]]:
    """A server whose connections idle 0.5 s and whose request heads take at most 1 s."""
    settings = make_settings(
        tmp_path,
        sqlite_template,
        timeout_keep_alive_seconds=KEEP_ALIVE,
        timeout_request_seconds=REQUEST,
    )
    with serve(settings, max_head_bytes=4096) as addr:
        yield addr


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` responses with Content-Length bodies: status, headers (lowercase), body."""
    data = b""
    responses: list[tuple[int, dict[str, str], bytes]] = []

    def more() -> bytes:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        return chunk

    while len(responses) < count:
        while b"\r\n\r\n" not in data:
            data += more()
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(data) < length:
            data += more()
        responses.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    assert data == b"", "more than was asked for"
    return responses


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    return read_responses(sock, 1)[0]


def closed_after(
    sock: socket.socket, *, trickle: bytes = b"", every: float = 0.3
) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` and what it sent meanwhile, sending
    ``trickle`` one byte every ``every`` seconds."""
    start = time.monotonic()
    answer = b""
    pending = list(trickle)
    next_send = start
    while time.monotonic() - start < 10:
        if pending and time.monotonic() >= next_send:
            try:
                sock.sendall(bytes([pending.pop(0)]))
            except (BrokenPipeError, ConnectionResetError):
                break
            next_send += every
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    else:
        pytest.fail("the server kept the connection open for 10 s")
    return time.monotonic() - start, answer


def test_a_connection_that_sends_nothing_is_closed(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        elapsed, answer = closed_after(sock)
    assert answer == b""
    assert KEEP_ALIVE * 0.8 <= elapsed < REQUEST + 1


def test_slow_headers_are_cut_off_with_408(address: tuple[str, int]) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: ubc\r\nX-Slow: " + b"a" * 100
    with connect(address) as sock:
        elapsed, answer = closed_after(sock, trickle=head, every=0.2)
    # One byte every 0.2 s resets nothing: the head is owed within 1 s of connecting.
    assert REQUEST * 0.8 <= elapsed < REQUEST + 1.5
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"type": "request_timeout"' in answer


def test_an_idle_kept_alive_connection_is_closed(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(GET)
        status, headers, _ = read_response(sock)
        assert status == 200
        assert "server" not in headers  # no `server: uvicorn`
        assert "date" in headers
        elapsed, _ = closed_after(sock)
    assert KEEP_ALIVE * 0.8 <= elapsed < REQUEST + 1


def test_a_slow_second_request_head_is_cut_off(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(GET)
        assert read_response(sock)[0] == 200
        # Each byte comes before the 0.5 s idle timer; the head as a whole is too slow.
        elapsed, answer = closed_after(sock, trickle=GET + GET, every=0.2)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert REQUEST * 0.8 <= elapsed < REQUEST + 1.5


def test_a_head_sent_in_pieces_in_time_and_pipelined_requests_are_served(
    address: tuple[str, int],
) -> None:
    with connect(address) as sock:
        for piece in (GET[:5], GET[5:20], GET[20:]):
            sock.sendall(piece)
            time.sleep(0.1)
        assert read_response(sock)[0] == 200
        sock.sendall(GET * 3)
        assert [status for status, _, _ in read_responses(sock, 3)] == [200, 200, 200]


def test_a_head_over_the_size_limit_answers_431(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: ubc\r\nX-Big: " + b"a" * 6000)
        status, headers, body = read_response(sock)
        assert status == 431
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "headers_too_large"
        assert sock.recv(1) == b""


def test_a_malformed_request_answers_400_in_the_error_shape(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 400
    assert json.loads(body)["error"]["type"] == "bad_request"


async def answer_at_once(scope: Any, receive: Any, send: Any) -> None:
    """An app that answers 404 without reading the request's body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def test_a_body_that_outlives_its_answer_is_cut_off(tmp_path: Path, sqlite_template: Path) -> None:
    """An app answers without reading the body (ubc's own BodyGuard reads every body
    first, and closes the connection when it refuses one; this is the protocol's rule
    for any other early answer): a client that keeps sending that body slowly is
    closed instead of being kept for as long as it trickles."""
    settings = make_settings(
        tmp_path,
        sqlite_template,
        timeout_keep_alive_seconds=KEEP_ALIVE,
        timeout_request_seconds=REQUEST,
    )
    head = b"POST /upload HTTP/1.1\r\nHost: ubc\r\nContent-Length: 100000\r\n\r\n"
    with serve(settings, app=answer_at_once) as addr, connect(addr) as sock:
        sock.sendall(head + b"x" * 10)
        status, headers, _ = read_response(sock)
        assert (status, headers.get("connection")) == (404, None)  # kept alive
        elapsed, _ = closed_after(sock, trickle=b"y" * 100, every=0.2)
    assert REQUEST * 0.8 <= elapsed < REQUEST + 1.5


def test_connections_above_the_cap_answer_503(tmp_path: Path, sqlite_template: Path) -> None:
    settings = make_settings(tmp_path, sqlite_template, max_connections=5)
    with serve(settings) as addr, contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(addr)) for _ in range(5)]
        for sock in held:
            sock.sendall(GET)
            assert read_response(sock)[0] == 200
        with connect(addr) as extra:
            extra.sendall(GET)
            status, headers, body = read_response(extra)
            assert status == 503
            assert headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert json.loads(body)["error"]["type"] == "overloaded"
            assert extra.recv(1) == b""
        # The held connections still work, and one closing makes room for another.
        held[0].sendall(GET)
        assert read_response(held[0])[0] == 200
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            with connect(addr) as again:
                again.sendall(GET)
                if read_response(again)[0] == 200:
                    break
            assert time.monotonic() < deadline, "no room after a connection closed"
            time.sleep(0.05)


def test_serve_passes_every_option_to_uvicorn_with_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran: list[ServerConfig] = []
    monkeypatch.setattr(serving, "run", ran.append)
    (tmp_path / "origin").write_text("test.ubc/serve\n")
    env = {
        "UBC_DATA_DIR": str(tmp_path),
        "UBC_ORIGIN": None,
        "UBC_TIMEOUT_KEEP_ALIVE_SECONDS": "7",
        "UBC_MAX_CONNECTIONS": "50",
    }
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            cli,
            ["serve", "--no-migrate", "--host", "0.0.0.0", "--workers", "3"]
            + ["--timeout-request", "12", "--max-header-bytes", "8192"],
            env=env,
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "Serving ledger test.ubc/serve on http://0.0.0.0:8000" in result.output
    [config] = ran
    assert isinstance(config, ServerConfig)
    assert (config.app, config.factory, config.workers) == ("ubc.app:create_app", True, 3)
    assert (config.host, config.port, config.http) == ("0.0.0.0", 8000, PROTOCOL)
    assert config.timeout_keep_alive == 7  # from the environment
    assert config.timeout_request == 12  # from the option
    assert config.limit_concurrency == 50
    assert config.h11_max_incomplete_event_size == 8192
    assert config.server_header is False
