"""What every page of the console shares: the templates, the page response (its CSP and
headers), the session cookie of a signed-in reader, and CSRF tokens.

The session cookie
    ``/signin`` takes a member's API key or the operator (or auditor) token once, in a
    POST body. The cookie then holds it **encrypted and authenticated** (NaCl SecretBox,
    XSalsa20-Poly1305) under a key derived from the ledger's signing key, with a random
    CSRF token and an expiry: the raw secret is never readable in the cookie, a cookie
    altered by anyone is refused, and every worker of ``ubc serve --workers N`` (they share
    the ledger key) reads it. It is ``HttpOnly`` (no script reads it), ``SameSite=Strict``
    (no other site's page sends it), ``Secure`` when the request came over https, and
    ``Path=/``. Each request decrypts it and authenticates the secret again, exactly as a
    bearer header would be: a revoked or expired API key signs the reader out.

CSRF
    Every state-changing form carries the session's CSRF token in a hidden ``csrf`` field,
    compared in constant time; before sign-in the token is a random value in a separate
    ``HttpOnly`` ``SameSite=Strict`` cookie (double submit). ``SameSite=Strict`` and a check
    of ``Origin`` (when the browser sends it) come on top.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from sqlalchemy.orm import Session

from ubc.auth import Principal, authenticate_bearer
from ubc.console import charts
from ubc.errors import UbcError

HERE = Path(__file__).parent
STATIC_URL = "/console/static"
# Only this origin's scripts, styles and calls; no inline script, no eval, no framing.
CONSOLE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SESSION_COOKIE = "ubc_session"
PRESESSION_COOKIE = "ubc_csrf"
SESSION_HOURS = 8
MAX_FORM = 1024 * 1024

templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["bar_chart"] = charts.bar_chart


@dataclass(frozen=True, slots=True)
class SignedIn:
    """The reader of a session: its principal, its secret (as a bearer would send it) and
    the session's CSRF token."""

    principal: Principal
    secret: str
    csrf: str

    @property
    def is_operator(self) -> bool:
        return self.principal.sees_everything

    @property
    def account(self) -> str | None:
        return self.principal.account


def _box(request: Request) -> SecretBox:
    """The session cookie's key: derived from the ledger's signing key (never the key)."""
    ledger_key = request.app.state.ctx.ledger_key
    if ledger_key is None:  # a served ledger always has its key; never a guessable one
        raise RuntimeError("the console's sessions need the ledger's signing key")
    label = b"ubc console session cookie v1"
    return SecretBox(hmac.new(bytes(ledger_key), label, hashlib.sha256).digest())


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session(request: Request, response: Response, secret: str) -> None:
    now: datetime = request.app.state.clock.now()
    expires = now + timedelta(hours=SESSION_HOURS)
    body = json.dumps(
        {"s": secret, "t": secrets.token_urlsafe(24), "e": int(expires.timestamp())}
    ).encode()
    sealed = base64.urlsafe_b64encode(_box(request).encrypt(body)).decode()
    response.set_cookie(
        SESSION_COOKIE,
        sealed,
        max_age=SESSION_HOURS * 3600,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def clear_session(request: Request, response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request)
    )


def _opened(request: Request) -> dict[str, Any] | None:
    sealed = request.cookies.get(SESSION_COOKIE)
    if not sealed:
        return None
    try:
        body = json.loads(_box(request).decrypt(base64.urlsafe_b64decode(sealed.encode())))
    except (CryptoError, ValueError, TypeError):
        return None
    if not isinstance(body, dict) or not all(k in body for k in ("s", "t", "e")):
        return None
    now: datetime = request.app.state.clock.now()
    if int(body["e"]) <= now.timestamp():
        return None
    return body


def signed_in(request: Request, session: Session) -> SignedIn | None:
    """The session's reader, authenticated again now; None without a valid session."""
    body = _opened(request)
    if body is None:
        return None
    try:
        principal = authenticate(request, session, str(body["s"]))
    except UbcError:
        return None
    return SignedIn(principal, str(body["s"]), str(body["t"]))


def authenticate(request: Request, session: Session, secret: str) -> Principal:
    """The principal of a secret, as if it came as a bearer (401 when unknown)."""
    return authenticate_bearer(
        session,
        f"Bearer {secret}",
        tokens=request.app.state.tokens,
        now=request.app.state.clock.now(),
        api_keys=request.app.state.api_key_principal,
    )


def presession_token(request: Request) -> str:
    """The CSRF token of a visitor not signed in (from its cookie, or a new one)."""
    return request.cookies.get(PRESESSION_COOKIE) or secrets.token_urlsafe(24)


def csrf_token(request: Request, reader: SignedIn | None) -> str:
    return reader.csrf if reader is not None else presession_token(request)


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (first value of each field)."""
    data = await request.body()
    if len(data) > MAX_FORM:
        return {}
    try:
        fields = parse_qs(data.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {name: values[0] for name, values in fields.items()}


def csrf_ok(request: Request, form: dict[str, str], reader: SignedIn | None) -> bool:
    """Whether a POST carries the right CSRF token and, when the browser says where it
    comes from, comes from this origin."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        here = urlsplit(str(request.base_url))
        there = urlsplit(origin)
        if (there.scheme, there.netloc) != (here.scheme, here.netloc):
            return False
    expected = reader.csrf if reader is not None else request.cookies.get(PRESESSION_COOKIE)
    sent = form.get("csrf", "")
    return bool(expected) and hmac.compare_digest(sent.encode(), str(expected).encode())


class _Unset:
    pass


UNSET = _Unset()


def page(
    request: Request,
    template: str,
    *,
    reader: SignedIn | None | _Unset = UNSET,
    status_code: int = 200,
    **context: Any,
) -> Response:
    """A page of the console, with its CSP, no framing and no caching of what it shows;
    ``reader``: the session's reader (read from the cookie when not given)."""
    if isinstance(reader, _Unset):
        session: Session = request.app.state.read_sessions()
        try:
            reader = signed_in(request, session)
        finally:
            session.rollback()
            session.close()
    csrf = csrf_token(request, reader)
    response = templates.TemplateResponse(
        request,
        template,
        {"ledger": request.app.state.ledger_info, "reader": reader, "csrf": csrf, **context},
        status_code=status_code,
    )
    harden(response)
    if reader is None and request.cookies.get(PRESESSION_COOKIE) != csrf:
        response.set_cookie(
            PRESESSION_COOKIE,
            csrf,
            path="/",
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
    return response


def harden(response: Response) -> Response:
    response.headers["content-security-policy"] = CONSOLE_CSP
    response.headers["x-frame-options"] = "DENY"
    response.headers["x-content-type-options"] = "nosniff"
    response.headers["referrer-policy"] = "same-origin"
    response.headers["cache-control"] = "no-store"
    return response


def to_signin(request: Request) -> Response:
    """Where a page that needs a session sends a reader without one."""
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return harden(RedirectResponse(f"/signin?next={quote(target, safe='')}", status_code=303))
