"""Structured logs (issue 17): request ids, one access line per request, and the log
configuration ``ubc serve`` gives uvicorn (``--log-format json|text``).

- :class:`RequestLog`, the outermost ASGI layer, takes the request id from
  ``X-Request-Id`` when it is sane (printable ASCII, at most 128 characters), else makes
  one (a UUID4); keeps it in a context variable for log lines and the gateway; answers it
  in ``X-Request-Id`` on every response (errors included); and, when the logger
  ``ubc.access`` is enabled at INFO (``ubc serve --access-log``), writes one line per
  request: method, path (never the query string), status, latency, request id, actor.
- :class:`JsonFormatter` writes one JSON object per line (``ts``, ``level``, ``logger``,
  ``msg``, then the record's fields); :class:`TextFormatter` one readable line.

Never logged: API keys, bearer tokens, private keys, signatures, request or response
bodies, query strings, headers. A line's fields are passed as ``extra={"fields": {...}}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LogFormat = Literal["text", "json"]

ACCESS = logging.getLogger("ubc.access")
#: The loggers ``--access-log`` switches on: the access lines and the usage lines.
PER_REQUEST_LOGGERS = ("ubc.access", "ubc.usage")
MAX_REQUEST_ID = 128
_HEADER = b"x-request-id"


class RequestInfo:
    """What the log lines of one request know of it: its id and, once authenticated, who
    made it (``member:alice``, ``operator``, an API key's account; never a secret)."""

    __slots__ = ("request_id", "generated", "actor")

    def __init__(self, request_id: str, generated: bool) -> None:
        self.request_id = request_id
        self.generated = generated
        self.actor: str | None = None


_CURRENT: ContextVar[RequestInfo | None] = ContextVar("ubc_request", default=None)


def current_request_id() -> str | None:
    info = _CURRENT.get()
    return None if info is None else info.request_id


def set_actor(actor: str) -> None:
    """Name the authenticated party of the request being served (if any)."""
    info = _CURRENT.get()
    if info is not None:
        info.actor = actor


def call_id() -> str:
    """The id of a model call: the request's id when the server made it (a UUID, so one
    id names the request, its log lines and its journaled usage entry), else a new UUID
    (a client's id may repeat; it is logged beside the call's)."""
    info = _CURRENT.get()
    if info is not None and info.generated:
        return info.request_id
    return new_request_id()


def adopt_call_id(call_id: str) -> None:
    """A model call whose hold was placed ahead under an id of its own (a spare hold,
    ``ubc.gateway.service``): when the server made the request's id, the request takes
    the call's, so that one id still names the request, its answer and its usage entry."""
    info = _CURRENT.get()
    if info is not None and info.generated:
        info.request_id = call_id


def new_request_id() -> str:
    """A random UUID4 in its canonical form, as ``str(uuid.uuid4())`` but in 0.9 µs
    rather than 2.2 (one per request without a usable ``X-Request-Id``)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _sane(raw: bytes) -> str | None:
    if not 0 < len(raw) <= MAX_REQUEST_ID:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


class RequestLog:
    """The request id and the access line of every HTTP request (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = None
        for name, value in scope["headers"]:
            if name == _HEADER:
                given = _sane(value)
                break
        info = RequestInfo(given or new_request_id(), given is None)
        token = _CURRENT.set(info)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Ours replaces one the application set (a model call's own id).
                headers = [h for h in message.get("headers", ()) if h[0].lower() != _HEADER]
                # Read now: a model call may have given the request its own id.
                headers.append((_HEADER, info.request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if ACCESS.isEnabledFor(logging.INFO):
                fields: dict[str, Any] = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,  # 0: no answer was sent (the client left, a crash)
                    "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                    "request_id": info.request_id,
                }
                if info.actor is not None:
                    fields["actor"] = info.actor
                ACCESS.info(
                    "%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields}
                )
            _CURRENT.reset(token)


# --- formatters ----------------------------------------------------------------------------


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
    if "request_id" not in fields:
        request_id = current_request_id()
        if request_id is not None:
            fields["request_id"] = request_id
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the fields of
    ``extra={"fields": ...}``, the request id of the request being served, and ``exc``
    (the traceback) for an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(line, default=str, ensure_ascii=False)


def _one_line(value: object) -> str:
    """``value`` as text that cannot break the line (a path may hold a newline); quoted
    as JSON if it has a space, a quote or a control character."""
    text = str(value)
    if text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <msg> key=value ...``, a traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():
            message = json.dumps(message, ensure_ascii=False)[1:-1]
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return text


FORMATTERS: dict[str, type[logging.Formatter]] = {"json": JsonFormatter, "text": TextFormatter}


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler on whatever ``sys.stderr`` is when a record is written, as
    logging's own last resort: a stderr replaced for a while (a test's capture, a CLI
    runner) is never written to after it was closed."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def log_config(
    log_format: LogFormat = "text", *, level: str = "info", access_log: bool = False
) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of ``ubc serve``, applied by uvicorn in every
    worker: ubc's and uvicorn's loggers in one format on stderr. uvicorn's own access log
    stays off (it would log query strings); ``access_log`` enables ``ubc.access`` and
    ``ubc.usage`` instead."""
    formatter = FORMATTERS[log_format]
    per_request = "INFO" if access_log else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ubc": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "ubc": {
                "()": f"{StderrHandler.__module__}.{StderrHandler.__qualname__}",
                "formatter": "ubc",
            }
        },
        "loggers": {
            "ubc": {"handlers": ["ubc"], "level": level.upper()},
            "uvicorn": {"handlers": ["ubc"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
            **{name: {"level": per_request} for name in PER_REQUEST_LOGGERS},
        },
    }
