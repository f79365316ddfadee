"""The operator's epochs page follows an epoch being opened, live (console.js polls the
public GET /api/epochs/N), in a real browser."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

import ubc.app
from ubc.client import UbcClient
from ubc.envelopes.payloads import format_timestamp
from ubc.signing import generate_signing_key

from .conftest import LiveServer


def test_an_opening_epoch_shows_its_progress_live(
    live_server: LiveServer, page: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = live_server
    operator = UbcClient(server.url, key=server.operator_key, token=server.operator_token)
    members = []
    for handle in ("ann", "ben", "cat"):
        member = UbcClient(server.url, key=generate_signing_key())
        member.register(handle)
        operator.admit(handle, "basic")
        members.append(member)
    # Allocations one at a time, in the background, held back until the test lets them go:
    # the epoch stays "opening" while the page is first shown.
    monkeypatch.setattr("ubc.epochs.service.CHUNK", 1)
    go = threading.Event()
    advance = ubc.app._advance_once

    def held(app: Any) -> list[str]:
        return advance(app) if go.is_set() else []

    monkeypatch.setattr("ubc.app._advance_once", held)
    try:
        now = server.app.state.clock.now()
        operator.submit(
            operator.envelope(
                "epoch.open",
                actor="operator",
                epoch=1,
                asset="CU",
                allocations={"basic": 100},
                carryover_cap=0,
                starts_at=format_timestamp(now),
                ends_at=format_timestamp(now + timedelta(days=30)),
            )
        )
        page.goto(server.url + "/signin")
        page.fill("#secret", server.operator_token)
        page.click("form.form button[type=submit]")
        page.wait_for_url(server.url + "/operator")
        page.goto(server.url + "/operator/epochs")
        assert page.text_content("#epoch-1 .status") == "opening"
        assert page.get_attribute("#epoch-1 progress", "data-live-epoch") == "1"
        assert page.text_content("#epoch-1 .progress-text").endswith("of 3")
        go.set()
        # (A selector, not wait_for_function: the page's CSP forbids the eval it uses.)
        page.wait_for_selector("#epoch-1 progress[data-settled=open]", timeout=15000)
        assert page.text_content("#epoch-1 .status") == "open"
        assert page.text_content("#epoch-1 .progress-text") == "3 of 3"
        polls = [r for r in page.sent if r["url"] == server.url + "/api/epochs/1"]
        assert polls, "the page asked the API for the epoch's progress"
        # The script is the console's own static file: no inline script on the page.
        scripts = page.eval_on_selector_all("script", "els => els.map(e => e.src)")
        assert scripts == [server.url + "/console/static/console.js"]
    finally:
        go.set()
        operator.close()
        for member in members:
            member.close()
