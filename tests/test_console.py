"""The web console in a real browser (Debian's chromium through Playwright)."""

from __future__ import annotations

from typing import Any

from ubc.signing import NoteVerifier

from .conftest import LiveServer


def test_home_shows_origin_vkey_and_a_checkpoint_that_verifies(
    live_server: LiveServer, page: Any
) -> None:
    response = page.goto(live_server.url + "/")
    assert response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    info = live_server.app.state.ledger_info
    assert page.text_content("#vkey").strip() == info["vkey"]
    checkpoint = page.text_content("#checkpoint")
    body = NoteVerifier.from_vkey(info["vkey"]).verify(checkpoint)
    assert body.splitlines()[0] == info["origin"]
    assert int(page.text_content("#journal-size")) == int(body.splitlines()[1])
    stylesheet = [r for r in page.sent if r["url"].endswith("console.css")]
    assert stylesheet, "the page loads its stylesheet from the server"
