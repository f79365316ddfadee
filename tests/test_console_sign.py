"""Self-custody signing in a real browser (Debian's chromium through Playwright) against a
served ledger: a member registers with a key made in the browser, the operator (its key
imported into another browser) admits it and opens an epoch, and the member sends,
donates, sells (another member, whose CLI key file is imported in a third browser, buys),
cancels, grants and revokes an API key and withdraws (the operator countersigns), all
signed in the browser; the ledger's balances are checked through the API after each step,
and every request the browsers sent is searched for the private keys."""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
from nacl.signing import SigningKey

from ubc.client import UbcClient
from ubc.signing import generate_signing_key, write_signing_key

from .conftest import LiveServer


def _recorded(browser: Any) -> Any:
    """A new browser context and page that keeps every request it sends in ``page.sent``
    (as the ``page`` fixture does)."""
    context = browser.new_context()
    page = context.new_page()
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: sent.append(
            {"method": r.method, "url": r.url, "headers": r.headers, "body": r.post_data_buffer}
        ),
    )
    page.sent = sent
    return page


@contextlib.contextmanager
def _screenshots_on_failure(pages: dict[str, Any], where: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for name, p in pages.items():
            with contextlib.suppress(Exception):
                p.screenshot(path=str(where / f"failure-{name}.png"), full_page=True)
        raise


def _go(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=yes]")


def _submit(page: Any, form: str = "#action-form") -> dict[str, str]:
    """Submit the form; wait for the receipt and return it as {term: description}."""
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#result[data-done=yes]:not([hidden]), .error:not([hidden])")
    errors = [e.text_content() for e in page.query_selector_all(".error:not([hidden])")]
    assert not errors, errors
    terms = page.query_selector_all("#result dt")
    details = page.query_selector_all("#result dd")
    result: dict[str, str] = {}
    for t, d in zip(terms, details, strict=True):
        result.setdefault(t.text_content(), d.text_content())
    return result


def _error_at(page: Any, field: str) -> str:
    """Submit the form expecting the API's error next to ``field``; its text."""
    page.click("#action-form button[type=submit]")
    page.wait_for_selector(f"#f-{field}-error:not([hidden])")
    text: str = page.text_content(f"#f-{field}-error")
    return text


def _fill(page: Any, **fields: str) -> None:
    for name, value in fields.items():
        page.fill(f"#f-{name}", value)


def _import_key(page: Any, url: str, role: str, key_file: Path, handle: str = "") -> None:
    _go(page, url + "/key")
    if handle:
        page.fill("#member-handle", handle)
    page.set_input_files(f"#{role}-file", str(key_file))
    page.click(f"#import-{role} button[type=submit]")
    page.wait_for_selector(f"#held-{role}[data-loaded=yes]")


def _key_encodings(seed: bytes, key_file: Path) -> list[bytes]:
    """Every spelling of a private key that could leave a browser."""
    key = SigningKey(seed)
    secret64 = bytes(key._signing_key)  # seed followed by public key (libsodium's form)
    spellings: list[bytes] = []
    for raw in (seed, secret64, secret64[:32]):
        spellings += [
            raw,
            raw.hex().encode(),
            raw.hex().upper().encode(),
            base64.b64encode(raw),
            base64.b64encode(raw).rstrip(b"="),
            base64.urlsafe_b64encode(raw),
            base64.urlsafe_b64encode(raw).rstrip(b"="),
        ]
    text = key_file.read_bytes()
    spellings += [text, text.strip()]
    # A JSON byte array, as a careless serialization of a Uint8Array would spell it.
    spellings.append(",".join(str(b) for b in seed).encode())
    return spellings


def _assert_no_secret_sent(pages: list[Any], secrets: list[bytes]) -> int:
    count = 0
    for p in pages:
        for request in p.sent:
            haystacks = [request["url"].encode(), request["body"] or b""]
            haystacks += [f"{k}: {v}".encode() for k, v in request["headers"].items()]
            for hay in haystacks:
                for secret in secrets:
                    assert secret not in hay, (request["method"], request["url"])
                    # Also percent-encoded, as a form or a URL would carry it.
                    assert quote_from_bytes(secret, safe="").encode() not in hay
            count += 1
    return count


def _balance(api: UbcClient, address: str, asset: str = "CU") -> int:
    for b in api.balance(address)["balances"]:
        if b["asset"] == asset:
            return b["available"]
    return 0


def test_a_member_registers_and_moves_value_signed_only_in_the_browser(
    live_server: LiveServer, browser: Any, page: Any, tmp_path: Path
) -> None:
    url = live_server.url
    data = live_server.data_dir
    api = UbcClient(url, token=live_server.operator_token)  # reads only (the operator token)
    closing = contextlib.ExitStack()
    closing.callback(api.close)
    info = api.ledger_info()
    assert info["enrollment"] == "invite"
    operator_seed = bytes(live_server.operator_key)
    # Bob keeps his key the CLI way, in a key file; he will import it into his browser.
    bob_file = tmp_path / "bob.key"
    bob_key = generate_signing_key()
    write_signing_key(bob_file, bob_key)

    alice = page
    operator = _recorded(browser)
    bob = _recorded(browser)
    pages = {"alice": alice, "operator": operator, "bob": bob}
    closing.callback(operator.context.close)
    closing.callback(bob.context.close)
    with closing, _screenshots_on_failure(pages, tmp_path):
        # --- Alice registers from the browser; her key is made there -------------------
        _go(alice, url + "/register")
        assert alice.get_attribute("#signer", "data-loaded") == "no"
        _fill(alice, handle="alice", display_name="Alice <b>A</b>")
        got = _submit(alice, "#register-form")
        assert got["address"] == "member:alice"
        assert got["key"] == "made in this browser"
        assert "wait for the operator to admit you" in alice.text_content("#waiting")
        member = api.member("alice")
        assert member["status"] == "registered" or member["status"] != "active"
        assert member["keys"][0]["keyid"] == got["key id"]
        # The key is in IndexedDB, non-extractable: exportKey rejects.
        refused = alice.evaluate(
            "async () => { const ubc = await import('/console/static/js/ubc.js');"
            " const held = await ubc.loadKey('member');"
            " const out = [held.privateKey.extractable];"
            " for (const f of ['pkcs8', 'jwk', 'raw']) {"
            "  try { await crypto.subtle.exportKey(f, held.privateKey); out.push('exported'); }"
            "  catch (e) { out.push(e.name); } }"
            " return out; }"
        )
        assert refused == [False, "InvalidAccessError", "InvalidAccessError", "InvalidAccessError"]

        # Bob registers the CLI way (not this page's concern), then imports his key file.
        with UbcClient(url, key=bob_key) as bob_cli:
            bob_cli.register("bob")
        _import_key(bob, url, "member", bob_file, handle="bob")
        assert "member:bob" in bob.text_content("#held-member")

        # --- The operator imports operator.key into its browser and admits both ---------
        _import_key(operator, url, "operator", data / "operator.key")
        _go(operator, url + "/operator/act/admit?member=alice")
        assert operator.input_value("#f-handle") == "alice"
        assert operator.get_attribute("#signer", "data-loaded") == "yes"
        _fill(operator, tier="basic")
        got = _submit(operator)
        assert got["type"] == "member.admit"
        assert api.member("alice")["status"] == "active"
        _go(operator, url + "/operator/act/admit?member=bob")
        _fill(operator, tier="basic")
        _submit(operator)

        # An error of the API shows next to the field it concerns, in words.
        _go(operator, url + "/operator/act/admit?member=nobody")
        _fill(operator, tier="basic")
        assert _error_at(operator, "handle") == "Not found: no member nobody"

        # --- Epoch 1: allocations by tier --------------------------------------------
        _go(operator, url + "/operator/act/epoch-open")
        _fill(operator, epoch="1", allocations="basic=100\npro=250", carryover_cap="1000")
        got = _submit(operator)
        assert got["type"] == "epoch.open"
        assert _balance(api, "member:alice") == 100
        assert _balance(api, "member:bob") == 100

        # --- A cause, registered by the operator in the browser ------------------------
        _go(operator, url + "/operator/act/cause-register")
        _fill(operator, slug="malaria", name="Malaria research", stewards="bob")
        operator.fill("#f-description", "Nets & research <script>x</script>")
        _submit(operator)
        assert api.cause("malaria")["stewards"] == ["bob"]
        _go(operator, url + "/operator/act/cause-update?slug=malaria")
        _fill(operator, name="Malaria research", stewards="bob, alice")
        _submit(operator)
        assert sorted(api.cause("malaria")["stewards"]) == ["alice", "bob"]

        # --- Alice sends, donates -----------------------------------------------------
        _go(alice, url + "/me/send")
        assert "member:alice" in alice.text_content("#signer")
        _fill(alice, to="bob", amount="10", memo="thanks ☕ <script>")
        got = _submit(alice)
        assert got["type"] == "transfer"
        assert _balance(api, "member:alice") == 90
        assert _balance(api, "member:bob") == 110
        # Too much: insufficient funds, shown at the amount, and nothing moved.
        _fill(alice, to="bob", amount="1000")
        assert _error_at(alice, "amount").startswith("Not enough funds: member:alice has 90 CU")
        assert _balance(api, "member:alice") == 90

        _go(alice, url + "/me/donate?cause=malaria")
        _fill(alice, amount="5")
        _submit(alice)
        assert _balance(api, "member:alice") == 85
        assert _balance(api, "cause:malaria") == 5

        # --- The market: Alice sells, Bob buys part, Alice cancels the rest -----------
        _go(alice, url + "/me/sell")
        _fill(alice, sell_amount="20", price_amount="300")
        got = _submit(alice)
        offer_id = got["offer id"]
        assert _balance(api, "member:alice") == 65
        # Bob needs USD: the operator deposits it (in the browser too).
        _go(operator, url + "/operator/act/deposit")
        _fill(operator, to="bob", asset="USD", amount="1000", external_ref="charge-1")
        _submit(operator)
        assert _balance(api, "member:bob", "USD") == 1000

        _go(bob, url + f"/me/buy?offer_id={offer_id}")
        assert bob.input_value("#f-offer_id") == offer_id
        _fill(bob, amount="10")
        _submit(bob)
        fee = 150 * info["market_fee_bps"] // 10_000
        assert _balance(api, "member:bob") == 120
        assert _balance(api, "member:bob", "USD") == 850
        assert _balance(api, "member:alice", "USD") == 150 - fee

        _go(alice, url + f"/me/cancel?offer_id={offer_id}")
        _submit(alice)
        assert _balance(api, "member:alice") == 75
        assert api.offer(offer_id)["status"] != "open"

        # --- An API key: made in the browser, shown once, then revoked ----------------
        _go(alice, url + "/me/keys/grant")
        _fill(alice, label="laptop")
        got = _submit(alice)
        secret = alice.text_content("#api-key-secret").strip()
        assert re.fullmatch(r"ubc_sk_[A-Za-z0-9_-]{43}", secret)
        account = f"{url}/api/accounts/member:alice"
        read = httpx.get(account, headers={"Authorization": f"Bearer {secret}"})
        assert read.status_code == 200
        _go(alice, url + "/me/keys/revoke")
        _fill(alice, key_hash=got["key hash"])
        _submit(alice)
        read = httpx.get(account, headers={"Authorization": f"Bearer {secret}"})
        assert read.status_code == 401

        # --- A withdrawal: Alice asks, the operator countersigns ----------------------
        _go(alice, url + "/me/withdraw")
        _fill(alice, amount="100", external_ref="payout-1")
        got = _submit(alice)
        withdrawal_id = got["withdrawal id"]
        assert got["status"] == "pending"
        assert _balance(api, "member:alice", "USD") == 150 - fee  # nothing moved yet
        _go(operator, url + "/operator/act/countersign")
        operator.fill("#f-token", live_server.operator_token)
        operator.click("#list-pending")
        operator.click(f"#pending button.use[data-id='{withdrawal_id}']")
        assert operator.input_value("#f-id") == withdrawal_id
        got = _submit(operator)
        assert got["type"] == "withdrawal"
        assert _balance(api, "member:alice", "USD") == 50 - fee
        assert operator.input_value("#f-token") == ""

        # --- Bob, a steward, sends from the cause; Alice replaces her key --------------
        _go(bob, url + "/me/send")
        _fill(bob, to="alice", amount="2", **{"from": "cause:malaria"})
        _submit(bob)
        assert _balance(api, "cause:malaria") == 3
        assert _balance(api, "member:alice") == 77
        old_keyid = api.member("alice")["keys"][0]["keyid"]
        _go(alice, url + "/me/keys/rotate")
        alice.check("#f-confirm-yes")
        got = _submit(alice)
        keys = api.member("alice")["keys"]
        current = [k["keyid"] for k in keys if k["current"]]
        assert current == [got["new key id"]]
        assert old_keyid not in current
        assert got["new key id"] in alice.text_content("#signer")
        _go(alice, url + "/me/send")
        _fill(alice, to="bob", amount="7")
        _submit(alice)  # signed by the new key
        assert _balance(api, "member:alice") == 70

        # --- Suspend, reinstate, change tier, close the epoch -------------------------
        for action, status in (("suspend", "suspended"), ("reinstate", "active")):
            _go(operator, url + f"/operator/act/{action}?member=alice")
            _fill(operator, reason="checking")
            _submit(operator)
            assert api.member("alice")["status"] == status
        _go(operator, url + "/operator/act/tier?member=alice")
        _fill(operator, tier="pro")
        _submit(operator)
        assert api.member("alice")["tier"] == "pro"
        _go(operator, url + "/operator/act/epoch-close?epoch=1")
        _submit(operator)
        assert api.ledger_info()["current_epoch"] in (None, 1)

        # --- No private key ever left a browser ------------------------------------------
        secrets = _key_encodings(operator_seed, data / "operator.key")
        secrets += _key_encodings(bytes(bob_key), bob_file)
        sent = _assert_no_secret_sent([alice, operator, bob], secrets)
        posts = [r for p in pages.values() for r in p.sent if r["method"] == "POST"]
        assert len(posts) >= 20
        assert sent > len(posts)
        # Alice's key was made in her browser: not even the browser can read it back.
        for p, role in ((alice, "member"), (bob, "member"), (operator, "operator")):
            assert (
                p.evaluate(
                    "async (role) => { const ubc = await import('/console/static/js/ubc.js');"
                    " const held = await ubc.loadKey(role);"
                    " try { await crypto.subtle.exportKey('pkcs8', held.privateKey); return 'no'; }"
                    " catch (e) { return e.name; } }",
                    role,
                )
                == "InvalidAccessError"
            )
