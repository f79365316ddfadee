"""Limits every HTTP request must fit in, and headers every response carries (issue 12).

Three pieces, installed by :func:`install` around the whole application:

- :class:`BodyGuard` reads a request's body before any route does: more than
  ``max_body_bytes`` answers 413 at once (a ``Content-Length`` over the limit before a
  byte of the body is read, a chunked body as soon as its count passes it, without
  keeping the rest); a body that has not arrived within ``timeout_request_seconds``
  answers 408; JSON nested deeper than ``max_json_depth`` answers 400, found by an
  iterative scan before any parser recurses into it. The route then gets the body
  as it was sent. Bodies held at once by one worker are bounded too
  (``max_buffered_bytes``, by default 8 bodies of the largest size): past that a request
  answers 503 with ``Retry-After``, so many connections cannot add up to more memory.
  Under ``/v1/`` the errors take OpenAI's shape, elsewhere the documented
  ``{"error": {"type", "message", "detail"}}``.
- :class:`SecurityHeaders` adds ``X-Content-Type-Options``, ``X-Frame-Options``,
  ``Referrer-Policy`` and a ``Content-Security-Policy`` to every response (500s
  included) and drops a ``Server`` header.
- ``/docs`` serves Swagger UI from the ``swagger-ui-bundle`` package, with no CDN and
  no inline script, so that its CSP can forbid both.
"""

from __future__ import annotations

import asyncio
import functools
import html
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import swagger_ui_bundle  # type: ignore[import-untyped]  # no stubs: one path attribute
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ubc.config import Settings
from ubc.errors import BadRequest, NotFound, PayloadTooLarge, UbcError, Unavailable

# --- JSON depth ------------------------------------------------------------------------

# One JSON string literal, or an unterminated one running to the end of the input.
# Possessive and anchored that way, every quote either closes its string or swallows the
# rest, so blanking strings out stays linear whatever the input (an unterminated string
# full of escaped quotes would otherwise be rescanned from each of them).
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
# Opening brackets become +1, closing ones -1 (as signed bytes); everything else goes.
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SCAN_CHUNK = 64 * 1024


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether JSON ``raw`` nests arrays and objects deeper than ``limit``, found without
    recursion and in linear time (a few C-level passes over the bytes).

    Exact for valid JSON. For invalid JSON it never counts less than a parser would have
    reached before failing, so input it passes cannot make ``json.loads`` recurse more
    than ``limit`` levels. UTF-16 and UTF-32 bodies (which ``json.loads`` accepts as
    bytes) are scanned after conversion.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case: too few brackets to nest that deep
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):
        try:
            raw = raw.decode(encoding).encode("utf-8")
        except UnicodeError:
            return False  # json.loads refuses it before parsing anything
    brackets = _STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS)
    view = memoryview(brackets).cast("b")
    depth = 0
    for start in range(0, len(view), _SCAN_CHUNK):
        levels = list(itertools.accumulate(view[start : start + _SCAN_CHUNK], initial=depth))
        if max(levels) > limit:
            return True
        depth = levels[-1]
    return False


def check_json_depth(raw: bytes, limit: int) -> None:
    """Raise :class:`BadRequest` if JSON ``raw`` nests deeper than ``limit``."""
    if json_depth_exceeds(raw, limit):
        raise BadRequest(
            f"the JSON body nests arrays and objects more than {limit} levels deep",
            detail={"max_json_depth": limit},
        )


def loads_limited(raw: bytes, max_depth: int) -> Any:
    """``json.loads`` of ``raw`` after :func:`check_json_depth`; never a RecursionError."""
    check_json_depth(raw, max_depth)
    return json.loads(raw)


# --- body size, read timeout and depth ---------------------------------------------------

# A body this large is scanned for depth on a worker thread, off the event loop.
_THREAD_SCAN_BYTES = 256 * 1024


class RequestTimeout(UbcError):
    status = 408
    type = "request_timeout"


class BodyGuard:
    """Reads and bounds every request body before the application sees it (see module)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_json_depth: int,
        timeout_seconds: float,
        max_buffered_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.timeout_seconds = timeout_seconds
        self.max_buffered_bytes = max_buffered_bytes or 8 * max_body_bytes
        self.buffered = 0  # bytes of the bodies read and not yet done with, this worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked = _body_framing(scope)
        if length is not None and length > self.max_body_bytes:
            await _refuse(scope, receive, send, self._too_large())
            return
        if not chunked and not length:
            await self.app(scope, receive, send)  # no body to read
            return
        held = [0]  # bytes of this request counted in self.buffered
        try:
            try:
                body = await self._read(receive, held)
                if body is None:
                    return  # the client went away; nobody to answer
                if len(body) > _THREAD_SCAN_BYTES:
                    await asyncio.to_thread(check_json_depth, body, self.max_json_depth)
                else:
                    check_json_depth(body, self.max_json_depth)
            except UbcError as error:
                await _refuse(scope, receive, send, error)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.buffered -= held[0]  # the body lives as long as the request

    async def _read(self, receive: Receive, held: list[int]) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_seconds
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                if loop.time() >= deadline:
                    raise TimeoutError
                # ``timeout_at`` arms a timer; ``wait_for`` would also wrap ``receive()`` in
                # a task of its own, three times the CPU per request (~20 µs).
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.timeout_seconds:g} seconds",
                    detail={"timeout_seconds": self.timeout_seconds},
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                chunks.clear()
                raise self._too_large()
            self.buffered += len(chunk)
            held[0] += len(chunk)
            if self.buffered > self.max_buffered_bytes:
                chunks.clear()
                raise Unavailable(
                    "the server is reading too many request bodies at once; retry shortly",
                    detail={"max_buffered_bytes": self.max_buffered_bytes},
                    retry_after=1,
                )
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than {self.max_body_bytes} bytes",
            detail={"max_body_bytes": self.max_body_bytes},
        )


def _body_framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared ``Content-Length`` (None if absent or unreadable) and whether the body
    is chunked (or of unknown length)."""
    length: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                chunked = True  # the server's parser refuses this; count whatever comes
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` whole once, then listens for a disconnect."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


_OPENAI_CODES = {
    400: "json_too_deep",
    408: "request_timeout",
    413: "request_too_large",
    503: "server_busy",
}


def error_body(path: str, error: UbcError) -> dict[str, Any]:
    """The body of ``error`` in the shape of the surface ``path`` belongs to."""
    if not is_openai_path(path):
        return error.to_body()
    return {
        "error": {
            "message": error.message,
            "type": "server_error" if error.status_code >= 500 else "invalid_request_error",
            "param": None,
            "code": _OPENAI_CODES.get(error.status_code, error.error_type),
        }
    }


async def _refuse(scope: Scope, receive: Receive, send: Send, error: UbcError) -> None:
    # A refused body is not read any further, so the connection cannot carry another
    # request: close it once the answer is out.
    headers = {"connection": "close"} if error.status_code in (408, 413, 503) else {}
    if isinstance(error, Unavailable):
        headers.update(error.headers)
    response = JSONResponse(
        error_body(scope["path"], error), status_code=error.status_code, headers=headers
    )
    await response(scope, receive, send)


# --- security headers ------------------------------------------------------------------

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI: its own script and stylesheet, inline style attributes (set by React), data:
# images (icons in its stylesheet), and fetch() of the OpenAPI document and of "Try it out"
# calls to this origin. No inline script, no eval, nothing from another origin.
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
_FIXED_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def is_docs_path(path: str) -> bool:
    return path == DOCS_URL or path.startswith(DOCS_URL + "/")


class SecurityHeaders:
    """Adds the security headers to every response start and drops ``Server``; a header
    the application set itself is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = (DOCS_CSP if is_docs_path(scope["path"]) else API_CSP).encode()

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"server"]
                present = {k.lower() for k, _ in headers}
                for name, value in (*_FIXED_HEADERS, (b"content-security-policy", csp)):
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_secured)


# --- /docs ---------------------------------------------------------------------------------

DOCS_URL = "/docs"
DOCS_STATIC = DOCS_URL + "/static"
_SWAGGER_DIR = Path(swagger_ui_bundle.swagger_ui_path)
# The only files of the package served (its index.html would start the petstore demo).
_SWAGGER_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# Starts the UI, as FastAPI's inline script does, reading its URLs from the page. No
# validator badge: it would load an image from validator.swagger.io.
_INIT_JS = """\
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    oauth2RedirectUrl: window.location.origin + root.dataset.oauth2RedirectUrl,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
})();
"""
_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{title}</title>
<link rel="stylesheet" type="text/css" href="{static}/swagger-ui.css">
<link rel="icon" type="image/png" href="{static}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi}" data-oauth2-redirect-url="{redirect}"></div>
<script src="{static}/swagger-ui-bundle.js"></script>
<script src="{static}/swagger-ui-init.js"></script>
</body>
</html>
"""
_REDIRECT_PAGE = """\
<!DOCTYPE html>
<html lang="en-US">
<head><meta charset="utf-8"><title>Swagger UI: OAuth2 Redirect</title></head>
<body><script src="{static}/oauth2-redirect.js"></script></body>
</html>
"""
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@functools.cache
def _oauth2_redirect_js() -> str:
    """The script of the package's ``oauth2-redirect.html``, served as a file."""
    page = (_SWAGGER_DIR / "oauth2-redirect.html").read_text(encoding="utf-8")
    found = _SCRIPT.search(page)
    return found.group(1) if found else ""


def install_docs(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Serve Swagger UI at ``/docs`` from the package's files (create the app with
    ``docs_url=None, redoc_url=None``). ReDoc is not served: it loads from a CDN."""

    def page(request: Request, template: str, **urls: str) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        values = {name: html.escape(root + url, quote=True) for name, url in urls.items()}
        return HTMLResponse(
            template.format(title=html.escape(f"{app.title} - Swagger UI"), **values),
            headers={"cache-control": "no-cache"},
        )

    @app.get(DOCS_URL, include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        return page(
            request,
            _PAGE,
            static=DOCS_STATIC,
            openapi=openapi_url,
            redirect=DOCS_URL + "/oauth2-redirect",
        )

    @app.get(DOCS_URL + "/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect(request: Request) -> HTMLResponse:
        return page(request, _REDIRECT_PAGE, static=DOCS_STATIC)

    @app.get(DOCS_STATIC + "/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        scripts: dict[str, Callable[[], str]] = {
            "swagger-ui-init.js": lambda: _INIT_JS,
            "oauth2-redirect.js": _oauth2_redirect_js,
        }
        if name in scripts:
            return Response(scripts[name](), media_type="text/javascript; charset=utf-8")
        if name not in _SWAGGER_FILES:
            raise NotFound(f"no file {name!r} in the documentation's assets")
        return FileResponse(_SWAGGER_DIR / name, media_type=_SWAGGER_FILES[name])


# --- installation ----------------------------------------------------------------------------


def install(app: FastAPI, settings: Settings) -> None:
    """Add the body guard (outside every middleware added before, such as the gateway's
    fast path), the documentation pages, and the security headers around everything,
    also the 500s of Starlette's outermost error middleware."""
    app.add_middleware(
        BodyGuard,
        max_body_bytes=settings.max_body_bytes,
        max_json_depth=settings.max_json_depth,
        timeout_seconds=settings.timeout_request_seconds,
    )
    install_docs(app, app.openapi_url or "/openapi.json")
    build = app.build_middleware_stack

    def build_secured() -> ASGIApp:
        return SecurityHeaders(build())

    app.build_middleware_stack = build_secured  # type: ignore[method-assign]
