"""The console's session cookie and CSRF checks, over real HTTP (no browser needed):
its attributes (Secure behind https), tampering, expiry, a revoked key, the sign-in
form's CSRF token, redirects that stay on this site, and API errors in words."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ubc.client import UbcClient
from ubc.clock import ManualClock
from ubc.signing import generate_signing_key

from .conftest import LiveServer, make_data_dir, run_server


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    with run_server(db_url, make_data_dir(tmp_path / "data"), clock=ManualClock()) as served:
        yield served


def member_keys(server: LiveServer) -> tuple[UbcClient, str, str]:
    """A member with two API keys: one that reads, one for models only."""
    member = UbcClient(server.url, key=generate_signing_key())
    member.register("alice")
    with UbcClient(server.url, key=server.operator_key, token=server.operator_token) as operator:
        operator.admit("alice", "basic")
    reader, _ = member.grant_api_key("console", scopes=("read",))
    models_only, _ = member.grant_api_key("models", scopes=("models",))
    return member, reader, models_only


def csrf(client: httpx.Client, path: str = "/signin") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found is not None
    return found.group(1)


def sign_in(client: httpx.Client, secret: str, **extra: str) -> httpx.Response:
    return client.post("/signin", data={"csrf": csrf(client), "secret": secret, **extra})


def test_session_cookie_rules(server: LiveServer) -> None:
    member, secret, models_only = member_keys(server)
    with member, httpx.Client(base_url=server.url) as client:
        # Without the form's CSRF token (or with another one) sign-in is refused.
        refused = client.post("/signin", data={"secret": secret})
        assert refused.status_code == 403
        assert "ubc_session" not in refused.headers.get("set-cookie", "")
        refused = client.post("/signin", data={"secret": secret, "csrf": "forged"})
        assert refused.status_code == 403
        # A key without the read scope, or an unknown one: refused, in words.
        answer = sign_in(client, models_only)
        assert answer.status_code == 403
        assert "no read scope" in answer.text
        assert sign_in(client, "ubc_sk_nope").status_code == 401

        # Signed in: an HttpOnly, SameSite=Strict cookie that is not the key.
        answer = sign_in(client, secret, next="//evil.example/")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/me"  # never to another site
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/" in cookie
        assert "Secure" not in cookie  # plain http here
        assert secret not in cookie
        assert answer.headers["x-frame-options"] == "DENY"
        assert client.get("/me").status_code == 200

        # Tampered with, the cookie is nobody's.
        sealed = client.cookies["ubc_session"]
        flipped = sealed[:10] + ("A" if sealed[10] != "A" else "B") + sealed[11:]
        with httpx.Client(base_url=server.url, cookies={"ubc_session": flipped}) as other:
            assert other.get("/me").headers["location"] == "/signin?next=%2Fme"

        # A bad cursor is an error in words, not a crash.
        bad = client.get("/me/history", params={"cursor": "x"})
        assert bad.status_code == 400
        assert "cursor" in bad.text

        # Revoking the key signs the session out at once.
        member.token = secret
        (granted,) = [k for k in member.api_keys() if k["label"] == "console"]
        member.revoke_api_key(granted["key_hash"])
        assert client.get("/me").headers["location"] == "/signin?next=%2Fme"

    # Behind TLS (a proxy saying so from loopback) the cookie is also Secure.
    # (httpx keeps Secure cookies for https URLs: the form's CSRF cookie is sent by hand.)
    with httpx.Client(base_url=server.url, headers={"X-Forwarded-Proto": "https"}) as client:
        form = client.get("/signin")
        assert "Secure" in form.headers["set-cookie"]
        token = csrf(client)
        answer = client.post(
            "/signin",
            data={"csrf": token, "secret": server.operator_token},
            headers={"Cookie": f"ubc_csrf={token}"},
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "/operator"
        assert "Secure" in answer.headers["set-cookie"]


def test_session_expires(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert sign_in(client, server.operator_token).status_code == 303
        assert client.get("/operator").status_code == 200
        server.clock.advance(7 * 3600)
        assert client.get("/operator").status_code == 200
        server.clock.advance(2 * 3600)
        assert client.get("/operator").headers["location"] == "/signin?next=%2Foperator"
        # A member's pages are not the operator's, and the other way round.
        assert sign_in(client, server.operator_token).status_code == 303
        assert client.get("/me").headers["location"] == "/operator"


def test_signout_needs_its_csrf_token(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        sign_in(client, server.operator_token)
        token = csrf(client, "/operator")
        assert client.post("/signout", data={"csrf": "nope"}).status_code == 403
        refused = client.post(
            "/signout", data={"csrf": token}, headers={"Origin": "http://evil.example"}
        )
        assert refused.status_code == 403
        assert client.get("/operator").status_code == 200
        done = client.post("/signout", data={"csrf": token}, headers={"Origin": server.url})
        assert done.status_code == 303
        assert client.get("/operator").status_code == 303


def test_market_shows_who_traded_when_the_journal_is_public(db_url: str, tmp_path: Path) -> None:
    from .console_seed import close, seed

    data = make_data_dir(tmp_path / "data")
    with run_server(db_url, data, journal_access="public") as served:
        seeded = seed(served, spend=False)
        try:
            trades = httpx.get(served.url + "/market").text.split('id="trades"')[1]
            assert "member:bob" in trades
            assert "member:carol" in trades
        finally:
            close(seeded)
