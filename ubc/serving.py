"""How ``ubc serve`` runs uvicorn: one configuration for the command and the tests, and
the connection limits uvicorn lacks (issue 12).

What uvicorn (0.55, httptools) does by itself, given the options of :func:`uvicorn_config`:

- closes a keep-alive connection idle *between* requests after ``timeout_keep_alive``;
- answers 503 when a request arrives while ``limit_concurrency`` connections are open;
- omits ``server: uvicorn`` (``server_header=False``).

What it does not, and :class:`LimitedHttpToolsProtocol` adds:

- no timer runs before the first request: a connection that sends nothing was kept
  forever. The keep-alive timer is now armed when the connection is made too;
- no deadline for the request *head*: one header byte every few seconds resets nothing
  and kept the connection forever. The head (request line and headers) must now be
  complete ``timeout_request`` seconds after the connection is made or the previous
  response is sent, else 408 and close;
- no size limit for the head with httptools (``h11_max_incomplete_event_size`` is h11's
  only): an endless header line was buffered in memory. More than ``max_head_bytes``
  before the headers are complete answers 431 and closes;
- a response sent before its request's body was read (a 413, a 408 from the body
  deadline) left the connection open for as long as the client trickled that body. The
  rest of the body must now arrive within ``timeout_request`` too, else close;
- its 503 and 400 answers are plain text: they now have the documented error shape.

The request *body* once the head is complete is the application's: the ASGI layer that
limits body size and read time (``ubc.http_guard``) answers it, and the rule above
closes the connection if the client keeps sending after that answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from ubc import logs, metrics
from ubc.config import Settings, get_settings

log = logging.getLogger("uvicorn.error")

# The largest request head (request line and headers) a connection may send: nginx allows
# 4 x 8 KiB by default, Node 16 KiB; bearer tokens and the OpenAI SDK's headers fit well.
MAX_HEAD_BYTES = 64 * 1024
APP = "ubc.app:create_app"
#: How long a stopping server waits for open responses before cutting them.
GRACEFUL_SHUTDOWN_SECONDS = 10
#: Seconds a worker may take to answer its supervisor's ping (see ``uvicorn_config``).
WORKER_HEALTHCHECK_SECONDS = 60

PROTOCOL = "ubc.serving:LimitedHttpToolsProtocol"


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration plus the request-head deadline, which it has no field for.

    It is pickled to every worker process, so the protocol finds the deadline there.
    """

    def __init__(self, app: Any, *, timeout_request: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.timeout_request = timeout_request


def uvicorn_config(
    settings: Settings,
    *,
    host: str,
    port: int,
    app: Any = APP,
    workers: int = 1,
    access_log: bool = False,
    log_level: str = "info",
    log_format: logs.LogFormat | None = None,
    max_head_bytes: int = MAX_HEAD_BYTES,
) -> ServerConfig:
    """The configuration ``ubc serve`` runs: ``app`` is the import string of the app
    factory (required with several workers) or an app object (tests).

    Logging (``ubc.logs.log_config``, applied by uvicorn in every worker): ubc's and
    uvicorn's loggers in ``log_format`` (default ``settings.log_format``) on stderr;
    ``access_log`` turns on ubc's access and usage lines, not uvicorn's access log, which
    would log query strings."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "factory": isinstance(app, str),
        "workers": workers,
        "http": PROTOCOL,
        "log_level": log_level,
        "log_config": logs.log_config(
            log_format or settings.log_format, level=log_level, access_log=access_log
        ),
        "access_log": False,
        "server_header": False,
        # uvicorn types it int; a float is used as is (loop.call_later).
        "timeout_keep_alive": settings.timeout_keep_alive_seconds,
        # Open responses that never end by themselves (GET /journal/stream) would hold a
        # shutdown forever: after this long they are cut (clients resume with
        # Last-Event-ID).
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        # Our protocol answers above it itself, in the documented shape (see below).
        "limit_concurrency": settings.max_connections,
        # h11's own head limit; our httptools protocol reads the same value.
        "h11_max_incomplete_event_size": max_head_bytes,
        # With several workers, uvicorn's supervisor kills a worker that does not answer
        # its ping within this many seconds (default 5), including one still importing the
        # app: on a busy two-core machine a worker's start took longer, and a worker was
        # then killed and restarted every few seconds, never serving.
        "timeout_worker_healthcheck": WORKER_HEALTHCHECK_SECONDS,
    }
    return ServerConfig(app, timeout_request=settings.timeout_request_seconds, **options)


def run(config: ServerConfig) -> None:
    """Serve ``config`` in this process or in ``config.workers`` processes: what
    ``uvicorn.run`` does with the ``Config`` it builds, which cannot carry ours."""
    server = uvicorn.Server(config)
    os.environ[metrics.BIND_HOST_ENV] = config.host  # GET /metrics: open on loopback (auto)
    try:
        if config.workers > 1:
            # Every worker's metrics in files of one fresh directory, set before they start.
            directory = metrics.prepare_multiprocess_dir()
            try:
                _Supervisor(config, sockets=[config.bind_socket()]).run()
            finally:
                metrics.remove_multiprocess_dir(directory)
        else:
            server.run()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl+C
        pass
    if config.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, telling prometheus-client of every worker that exited."""

    def keep_subprocess_alive(self) -> None:
        self._replaced(super().keep_subprocess_alive)

    def handle_signals(self) -> None:  # HUP restarts them all, TTOU removes one
        self._replaced(super().handle_signals)

    def _replaced(self, step: Any) -> None:
        before = {process.pid for process in self.processes}
        step()
        for pid in before - {process.pid for process in self.processes}:
            metrics.worker_exited(pid)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size limit, a deadline
    for a body that outlives its response, and answers in the documented error shape."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # A plain uvicorn.Config (``uvicorn --http ubc.serving:...``) has no deadline field.
        timeout_request = getattr(config, "timeout_request", None)
        if timeout_request is None:
            timeout_request = get_settings().timeout_request_seconds
        self.timeout_request: float = timeout_request
        self.max_head_bytes = config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
        # uvicorn's own check answers in plain text; ours, in on_headers_complete, does not.
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = False  # between the first byte of a request and its last header
        self._head_bytes = 0

    # --- the deadline: one timer, armed while the client owes us something ----------------

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_request, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_head:
            self._answer_and_close(408, "request_timeout", "the request head came too slowly")
        else:  # nothing sent yet, or the rest of a body already answered: just close
            self.transport.close()

    # --- uvicorn's hooks ------------------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # uvicorn arms its idle timer only after a response; a silent new connection is as
        # idle as a kept-alive one. Any data cancels it (data_received), the deadline stays.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # httptools keeps an unfinished head in memory: bound it. (A chunk that also
            # completes the head is not counted, so a body in it never is.)
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._answer_and_close(
                    431,
                    "headers_too_large",
                    f"the request line and headers exceed {self.max_head_bytes} bytes",
                )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()  # the app has the request now; its body is the app's to time
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            log.warning("More than %d connections: answering 503.", self.max_connections)
            app, self.app = self.app, _overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete:
            # The rest of a body answered early has arrived: now the next head is owed.
            self._arm()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing() or pipelined:
            return  # closed, or the next request (its head complete) is being answered
        # The next request's head is owed, or, if this response came before its request's
        # body was read (cycle.more_body), the rest of that body: either within the deadline.
        self._arm()

    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(400, "bad_request", msg)

    # --- raw answers, outside the app -----------------------------------------------------

    def _answer_and_close(self, status: int, error_type: str, message: str) -> None:
        body = _error_body(error_type, message)
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"x-content-type-options: nosniff\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


def _error_body(error_type: str, message: str) -> bytes:
    error = {"error": {"type": error_type, "message": message, "detail": {}}}
    return json.dumps(error).encode()


async def _overloaded(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The answer above ``max_connections``: 503, try again shortly, and close."""
    body = _error_body("overloaded", "too many connections; try again shortly")
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"retry-after", b"1"),
                (b"x-content-type-options", b"nosniff"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
