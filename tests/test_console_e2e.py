"""The whole console, end to end, in a real browser (Debian's chromium through Playwright)
against a served ledger whose models are served by a fake OpenAI-compatible upstream:

members register in the browser, the operator (signed in by its token, its key imported
into its browser) admits them and opens an epoch there, a member sends, donates, sells,
another buys, the member grants an API key in the browser, signs in with it, makes model
calls through the official ``openai`` SDK and reads the chart of what they cost on
/me/spend; the public pages show a checkpoint whose signature this test checks with the
ledger's public key alone; no request any page sent carries a private key, no page
breaks its Content-Security-Policy, and ``<script>`` values show as text everywhere.

One flow per engine; a screenshot of each browser, and of each main page, on failure."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from nacl.signing import VerifyKey

from ubc.client import UbcClient
from ubc.console import actions as console_actions
from ubc.console import routes as console_routes
from ubc.signing import generate_signing_key, write_signing_key

from .conftest import LiveServer, make_data_dir, run_server
from .console_helpers import (
    assert_clean,
    assert_no_secret_sent,
    balance,
    fill,
    go,
    import_key,
    key_encodings,
    recorded,
    screenshots_on_failure,
    sign_in,
    submit,
    watch,
)
from .upstream import FakeUpstream, run_upstream

# Prices in CU per 1K tokens: chat-a costs 1 CU per input token and 2 per output token,
# chat-b 2 and 4 (integers, so the expected CU is exact).
MODELS_TOML = """
[models."chat-a"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-a"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000
max_output_tokens = 64

[models."chat-b"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-b"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 2000
output_price = 4000
max_output_tokens = 64
"""
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
ANSWER = 16  # the fake upstream's answer length, in tokens
MAIN_PAGES = (
    "/",
    "/checkpoints",
    "/epochs",
    "/causes",
    "/market",
    "/me",
    "/me/spend",
    "/operator",
    "/operator/report?epoch=1",
)


@dataclass
class Served:
    server: LiveServer
    upstream: FakeUpstream


@pytest.fixture
def served(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setenv("UBC_TEST_UPSTREAM_KEY", "sk-upstream")
    with run_upstream(api_key="sk-upstream", default_answer_tokens=ANSWER) as fake:
        models = tmp_path / "models.toml"
        models.write_text(MODELS_TOML.format(api_base=fake.api_base))
        data = make_data_dir(tmp_path / "data")
        with run_server(db_url, data, models_file=models) as server:
            yield Served(server, fake)


def prompt_tokens(messages: list[dict[str, str]]) -> int:
    """What the fake upstream counts: words of every message, and one per message."""
    return sum(len(m["content"].split()) + 1 for m in messages)


def verify_note(note: str, ledger_key: VerifyKey, name: str) -> str:
    """A signed note's text, checked by hand (C2SP signed-note) with the ledger's public
    key alone: the signature line's key hash and its Ed25519 signature over the text."""
    text, _, signatures = note.partition("\n\n")
    text += "\n"
    public = bytes(ledger_key)
    key_hash = hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4]
    for line in signatures.splitlines():
        signer, _, encoded = line.removeprefix("\u2014 ").rpartition(" ")
        blob = base64.b64decode(encoded)
        if signer == name and blob[:4] == key_hash:
            ledger_key.verify(text.encode(), blob[4:])  # raises when it does not verify
            return text
    raise AssertionError("no signature of the ledger's key on the checkpoint")


def wait_settled(api: UbcClient, address: str) -> None:
    """Until every model call's hold on ``address`` is settled."""
    deadline = time.monotonic() + 20
    while any(b["pending_debits"] for b in api.balance(address)["balances"]):
        assert time.monotonic() < deadline, "model-call holds still open"
        time.sleep(0.05)


def test_a_member_from_registration_to_the_chart_of_their_model_spend(
    served: Served, browser: Any, page: Any, tmp_path: Path
) -> None:
    server = served.server
    url = server.url
    data = server.data_dir
    api = UbcClient(url, token=server.operator_token)  # reads only
    closing = contextlib.ExitStack()
    closing.callback(api.close)
    fee_bps = int(api.ledger_info()["market_fee_bps"])
    # Bob's key was made by the CLI; he imports its file, then registers in the browser.
    bob_file = tmp_path / "bob.key"
    bob_key = generate_signing_key()
    write_signing_key(bob_file, bob_key)

    alice = watch(page)
    operator = recorded(browser)
    bob = recorded(browser)
    pages = {"alice": alice, "operator": operator, "bob": bob}
    for p in (operator, bob):
        closing.callback(p.context.close)
    with closing, screenshots_on_failure(pages, tmp_path / "shots", url, MAIN_PAGES):
        # --- Registration, in the browser ------------------------------------------------
        go(alice, url + "/register")
        fill(alice, handle="alice", display_name=XSS)
        got = submit(alice, "#register-form")
        assert got["key"] == "made in this browser"
        assert "wait for the operator to admit you" in alice.text_content("#waiting")
        import_key(bob, url, "member", bob_file, handle="bob")
        go(bob, url + "/register")
        fill(bob, handle="bob")
        assert submit(bob, "#register-form")["key"] == "the one this browser held"

        # --- The operator: signed in by its token, its key imported; admits both --------
        sign_in(operator, url, server.operator_token, "/operator")
        import_key(operator, url, "operator", data / "operator.key")
        for handle in ("alice", "bob"):
            operator.goto(url + "/operator/members?status=pending")
            operator.click(f"#members tr[data-handle={handle}] a:text('Admit')")
            operator.wait_for_selector("body[data-ready=yes]")
            assert operator.input_value("#f-handle") == handle
            fill(operator, tier="basic")
            assert submit(operator)["type"] == "member.admit"
            assert api.member(handle)["status"] == "active"
        # The name is shown as text on the operator's pages.
        operator.goto(url + "/operator/members")
        assert operator.text_content("#members tr[data-handle=alice] td:nth-child(2)") == XSS

        # --- An epoch, opened in the browser; a cause ------------------------------------
        operator.click("nav.sub a:text('Open an epoch')")
        operator.wait_for_selector("body[data-ready=yes]")
        fill(operator, epoch="1", allocations="basic=1000")
        assert submit(operator)["type"] == "epoch.open"
        operator.goto(url + "/operator/epochs")
        operator.wait_for_selector("#epoch-1 .status:text('open')")
        assert balance(api, "member:alice") == 1000
        go(operator, url + "/operator/act/cause-register")
        fill(operator, slug="open-research", name="Open research", stewards="bob")
        submit(operator)
        # A prefilled <script> stays a value on a signing page.
        go(operator, url + "/operator/act/cause-update?slug=open-research&name=" + XSS)
        assert operator.input_value("#f-name") == XSS

        # --- Alice: an API key made in her browser; she signs in with it to read --------
        go(alice, url + "/me/keys/grant")
        fill(alice, label="laptop")
        submit(alice)
        api_key = alice.text_content("#api-key-secret").strip()
        sign_in(alice, url, api_key, "/me")
        assert alice.text_content("h1") == XSS
        assert int(alice.text_content("#balances tr[data-asset=CU] .available")) == 1000

        # --- Send, donate, sell: from the read pages to the signing pages and back -------
        alice.click("nav.sub a:text('Send')")
        alice.wait_for_selector("body[data-ready=yes]")
        signer = alice.text_content("#signer")
        assert "member:alice" in signer
        assert alice.get_attribute("#signer", "data-mismatch") is None
        fill(alice, to="bob", amount="100", memo=XSS)
        assert submit(alice)["type"] == "transfer"
        alice.goto(url + "/causes")
        alice.click("#cause-open-research a:text('Donate')")
        alice.wait_for_selector("body[data-ready=yes]")
        assert alice.input_value("#f-cause") == "open-research"
        fill(alice, amount="50")
        submit(alice)
        alice.click("nav.sub a:text('Sell')")
        alice.wait_for_selector("body[data-ready=yes]")
        fill(alice, sell_amount="200", price_amount="300")
        offer_id = submit(alice)["offer id"]
        alice.click("nav.sub a:text('Balances')")
        assert int(alice.text_content("#balances tr[data-asset=CU] .available")) == 650

        # --- Bob buys part of it with USD the operator deposited -------------------------
        go(operator, url + "/operator/act/deposit")
        fill(operator, to="bob", asset="USD", amount="1000", external_ref="card-1")
        submit(operator)
        go(bob, url + f"/me/buy?offer_id={offer_id}")
        fill(bob, amount="100")
        submit(bob)
        assert balance(api, "member:bob") == 1000 + 100 + 100
        paid = 150
        assert balance(api, "member:bob", "USD") == 1000 - paid
        assert balance(api, "member:alice", "USD") == paid - paid * fee_bps // 10_000

        # --- Model calls through the official SDK, with the key made in the browser ------
        calls = [
            ("chat-a", [{"role": "user", "content": "hello compute ledger"}], None),
            ("chat-a", [{"role": "user", "content": "how much did I spend"}], None),
            ("chat-b", [{"role": "user", "content": "short answer"}], 5),
        ]
        spent: dict[str, dict[str, int]] = {}
        with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0) as sdk:
            for model, messages, cap in calls:
                extra = {"max_tokens": cap} if cap else {}
                answer = sdk.chat.completions.create(model=model, messages=messages, **extra)
                assert answer.usage is not None
                expected_in, expected_out = prompt_tokens(messages), cap or ANSWER
                assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
                    expected_in,
                    expected_out,
                )
                per_k = {"chat-a": (1000, 2000), "chat-b": (2000, 4000)}[model]
                cost = -(-(expected_in * per_k[0] + expected_out * per_k[1]) // 1000)
                row = spent.setdefault(model, {"calls": 0, "input": 0, "output": 0, "cost": 0})
                row["calls"] += 1
                row["input"] += expected_in
                row["output"] += expected_out
                row["cost"] += cost
        wait_settled(api, "member:alice")
        total_cost = sum(r["cost"] for r in spent.values())
        assert spent["chat-a"] == {"calls": 2, "input": 4 + 6, "output": 32, "cost": 10 + 64}

        # --- The chart of her model spend, with the right numbers ------------------------
        alice.click("nav.sub a:text('Model spend')")
        alice.wait_for_url(url + "/me/spend")
        shown: dict[str, dict[str, int]] = {}
        for tr in alice.locator("#by-model tbody tr").all():
            cells = [c.strip() for c in tr.locator("td").all_text_contents()]
            calls_, input_, output, cu = (int(c) for c in cells[1:])
            shown[cells[0]] = {"calls": calls_, "input": input_, "output": output, "cost": cu}
        assert shown == spent
        days = alice.locator("#by-day tbody tr")
        assert days.count() == 1
        assert int(days.first.locator("td").nth(3).text_content()) == total_cost
        bars = alice.locator("#chart-1 svg rect.bar")  # CU by model: one bar each
        assert bars.count() == 2
        titles = sorted(t.strip() for t in bars.locator("title").all_text_contents())
        assert titles == sorted(f"{m}: {r['cost']} CU" for m, r in spent.items())
        tokens_bars = alice.locator("#chart-2 svg rect.bar title").all_text_contents()
        assert sorted(t.strip() for t in tokens_bars) == sorted(
            f"{m}: {r['input'] + r['output']}" for m, r in spent.items()
        )
        alice.click("nav.sub a:text('Balances')")
        available = int(alice.text_content("#balances tr[data-asset=CU] .available"))
        assert available == 1000 - 100 - 50 - 200 - total_cost

        # --- A withdrawal with a <script> reference, countersigned from the session -------
        go(alice, url + "/me/withdraw")
        fill(alice, amount="10", external_ref=XSS)
        withdrawal = submit(alice)["withdrawal id"]
        operator.click("nav.sub a:text('Countersign')")
        operator.wait_for_selector("body[data-ready=yes]")
        row = operator.locator(f"#pending tr[data-id='{withdrawal}']")
        assert row.locator("td").nth(3).text_content() == XSS
        row.locator("button.use").click()
        assert submit(operator)["type"] == "withdrawal"

        # --- The public pages: a checkpoint verified with the ledger's public key alone --
        public = recorded(browser)
        closing.callback(public.context.close)
        public.goto(url + "/")
        vkey = public.text_content("#vkey").strip()
        name, _, encoded = vkey.split("+", 2)  # base64 may hold "+" too
        raw = base64.b64decode(encoded)
        assert raw[0] == 1
        assert raw[1:] == bytes(server.ledger_key.verify_key)
        text = verify_note(public.text_content("#checkpoint"), VerifyKey(raw[1:]), name)
        origin, size, root = text.splitlines()[:3]
        assert origin == server.settings.origin
        assert int(size) == int(public.text_content("#journal-size"))
        public.goto(url + "/checkpoints")
        assert public.locator("#heads tbody tr").first.locator("td").nth(1).text_content() == root

        # --- Every main page, in each role: no CSP violation, no script ran --------------
        for path in ("/", "/checkpoints", "/epochs", "/causes", "/market", "/receipt"):
            public.goto(url + path)
        for path in ("/me", "/me/history", "/me/spend", "/me/donations", "/me/market"):
            alice.goto(url + path)
        alice.goto(url + "/me/keys")
        alice.goto(url + "/me/withdrawals")
        for action in console_actions.ACTIONS:
            if action.role == "member" and action.name != "rotate":
                go(alice, url + action.path)
        go(alice, url + "/key")
        for path in ("/operator", "/operator/members", "/operator/epochs", "/operator/causes"):
            operator.goto(url + path)
        operator.goto(url + "/operator/report?epoch=1")
        operator.goto(url + "/operator/withdrawals")
        for action in console_actions.ACTIONS:
            if action.role == "operator":
                go(operator, url + action.path)

        # --- No private key left a browser -------------------------------------------------
        secrets = key_encodings(bytes(server.operator_key), data / "operator.key")
        secrets += key_encodings(bytes(bob_key), bob_file)
        searched = assert_no_secret_sent([alice, operator, bob, public], secrets)
        assert searched > 40
        # Alice's key was made in her browser and cannot be read back, not even there.
        exported = alice.evaluate(
            "async () => { const ubc = await import('/console/static/js/ubc.js');"
            " const held = await ubc.loadKey('member');"
            " try { await crypto.subtle.exportKey('pkcs8', held.privateKey); return 'exported'; }"
            " catch (e) { return e.name; } }"
        )
        assert exported == "InvalidAccessError"
        # The API key went once, in the sign-in POST, and then only as a bearer to /v1.
        carrying = [
            (r["method"], r["url"])
            for r in alice.sent
            if api_key in (r["body"] or b"").decode(errors="replace")
            or api_key in r["url"]
            or api_key in str(r["headers"])
        ]
        assert carrying == [("POST", url + "/signin")]
        for p in pages.values():
            assert_clean(p)
        assert_clean(public)


def test_security_headers_and_csrf_on_every_console_route(live_server: LiveServer) -> None:
    """Every console response, static files included, has X-Frame-Options: DENY (and the
    console's CSP on pages); every state-changing form POST of the console wants the CSRF
    token (the receipt check changes nothing and stores nothing)."""
    url = live_server.url
    pages = ["/", "/checkpoints", "/epochs", "/causes", "/market", "/receipt", "/signin"]
    pages += ["/key", "/register"] + [a.path for a in console_actions.ACTIONS]
    statics = ["/console/static/console.css", "/console/static/console.js"]
    statics += ["/console/static/js/ubc.js", "/console/static/js/actions.js"]
    with httpx.Client(base_url=url) as http:
        for path in pages + statics + ["/me", "/operator", "/console/static/missing.js"]:
            response = http.get(path)
            assert response.headers["x-frame-options"] == "DENY", path
            if path in pages:
                assert response.headers["content-security-policy"] == console_routes.CONSOLE_CSP
        assert "'unsafe-inline'" not in console_routes.CONSOLE_CSP
        assert "frame-ancestors 'none'" in console_routes.CONSOLE_CSP
        # The console's POST routes: exactly these, and the two that change state want CSRF.
        posts = {
            route.path
            for router in (console_routes.router, console_actions.router)
            for route in router.routes
            if "POST" in getattr(route, "methods", set())
        }
        assert posts == {"/signin", "/signout", "/receipt"}
        refused = http.post("/signin", data={"secret": live_server.operator_token})
        assert refused.status_code == 403
        assert "ubc_session" not in refused.headers.get("set-cookie", "")
        token = re.search(r'name="csrf" value="([^"]+)"', http.get("/signin").text)
        assert token is not None
        signed = http.post("/signin", data={"csrf": token[1], "secret": live_server.operator_token})
        assert signed.status_code == 303
        assert "ubc_session" in http.cookies
        # Signed in, signing out wants the session's own token (not the form's old one).
        for forged in ({}, {"csrf": token[1]}, {"csrf": "guess"}):
            assert http.post("/signout", data=forged).status_code == 403, forged
        assert http.get("/operator").status_code == 200  # still signed in
        # The countersign page needs the operator's session: no reader, no listing.
        assert "pending-title" in http.get("/operator/act/countersign").text
        http.cookies.clear()
        answer = http.get("/operator/act/countersign")
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/signin?next=")


def test_a_signed_in_member_holding_another_members_key_is_warned(
    live_server: LiveServer, page: Any, tmp_path: Path
) -> None:
    """Signed in (to read) as bob while this browser holds alice's key (to sign): every
    signing page says so, with a link to load bob's key; without a key, 'Load your key'."""
    url = live_server.url
    watch(page)
    members: dict[str, UbcClient] = {}
    with UbcClient(url, key=live_server.operator_key, token=live_server.operator_token) as op:
        for handle in ("alice", "bob"):
            key = generate_signing_key()
            write_signing_key(tmp_path / f"{handle}.key", key)
            members[handle] = UbcClient(url, key=key)
            members[handle].register(handle)
            op.admit(handle, "basic")
    secret, _ = members["bob"].grant_api_key("console", scopes=("read",))
    for member in members.values():
        member.close()
    with screenshots_on_failure({"bob": page}, tmp_path / "shots"):
        sign_in(page, url, secret, "/me")
        page.click("nav.sub a:text('Send')")
        page.wait_for_selector("body[data-ready=yes]")
        assert page.get_attribute("#signer", "data-loaded") == "no"
        load = page.locator("#signer a:text('Load your key')")
        assert load.get_attribute("href") == "/key?handle=bob"
        load.click()
        page.wait_for_selector("body[data-ready=yes]")
        assert page.input_value("#member-handle") == "bob"
        page.fill("#member-handle", "alice")
        page.set_input_files("#member-file", str(tmp_path / "alice.key"))
        page.click("#import-member button[type=submit]")
        page.wait_for_selector("#held-member[data-loaded=yes]")
        go(page, url + "/me/donate")
        assert page.get_attribute("#signer", "data-mismatch") == "yes"
        warning = page.text_content("#signer")
        assert "signed in as member:bob" in warning
        assert "member:alice" in warning
        fix = page.locator("#signer a", has_text="Load member:bob's key")
        assert fix.get_attribute("href") == "/key?handle=bob"
        # From the signing page back to the read pages.
        page.click("nav.sub a:text('Balances')")
        page.wait_for_url(url + "/me")
        assert_clean(page)
        assert re.search(r"member:bob", page.text_content("#account"))
        # The watch hears the CSP: an image from elsewhere is refused, and said.
        page.evaluate(
            "document.body.insertAdjacentHTML('beforeend', '<img src=\"http://127.0.0.2:9/x.png\">')"
        )
        page.wait_for_timeout(200)
        assert any("img-src" in line for line in page.refused), page.refused
