"""Self-custody signing in a real browser (Debian's chromium through Playwright) against a
served ledger: a member registers with a key made in the browser, the operator (its key
imported into another browser) admits it and opens an epoch, and the member sends,
donates, sells (another member, whose CLI key file is imported in a third browser, buys),
cancels, grants and revokes an API key and withdraws (the operator countersigns), all
signed in the browser; the ledger's balances are checked through the API after each step,
and every request the browsers sent is searched for the private keys."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import httpx

from ubc.client import UbcClient
from ubc.signing import generate_signing_key, write_signing_key

from .conftest import LiveServer
from .console_helpers import (
    assert_clean,
    assert_no_secret_sent,
    balance,
    error_at,
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

    alice = watch(page)
    operator = recorded(browser)
    bob = recorded(browser)
    pages = {"alice": alice, "operator": operator, "bob": bob}
    closing.callback(operator.context.close)
    closing.callback(bob.context.close)
    with closing, screenshots_on_failure(pages, tmp_path):
        # --- Alice registers from the browser; her key is made there -------------------
        go(alice, url + "/register")
        assert alice.get_attribute("#signer", "data-loaded") == "no"
        fill(alice, handle="alice", display_name="Alice <b>A</b>")
        got = submit(alice, "#register-form")
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
        import_key(bob, url, "member", bob_file, handle="bob")
        assert "member:bob" in bob.text_content("#held-member")

        # --- The operator imports operator.key into its browser and admits both ---------
        import_key(operator, url, "operator", data / "operator.key")
        go(operator, url + "/operator/act/admit?member=alice")
        assert operator.input_value("#f-handle") == "alice"
        assert operator.get_attribute("#signer", "data-loaded") == "yes"
        fill(operator, tier="basic")
        got = submit(operator)
        assert got["type"] == "member.admit"
        assert api.member("alice")["status"] == "active"
        go(operator, url + "/operator/act/admit?member=bob")
        fill(operator, tier="basic")
        submit(operator)

        # An error of the API shows next to the field it concerns, in words.
        go(operator, url + "/operator/act/admit?member=nobody")
        fill(operator, tier="basic")
        assert error_at(operator, "handle") == "Not found: no member nobody"

        # --- Epoch 1: allocations by tier --------------------------------------------
        go(operator, url + "/operator/act/epoch-open")
        fill(operator, epoch="1", allocations="basic=100\npro=250", carryover_cap="1000")
        got = submit(operator)
        assert got["type"] == "epoch.open"
        assert balance(api, "member:alice") == 100
        assert balance(api, "member:bob") == 100

        # --- A cause, registered by the operator in the browser ------------------------
        go(operator, url + "/operator/act/cause-register")
        fill(operator, slug="malaria", name="Malaria research", stewards="bob")
        operator.fill("#f-description", "Nets & research <script>x</script>")
        submit(operator)
        assert api.cause("malaria")["stewards"] == ["bob"]
        go(operator, url + "/operator/act/cause-update?slug=malaria")
        fill(operator, name="Malaria research", stewards="bob, alice")
        submit(operator)
        assert sorted(api.cause("malaria")["stewards"]) == ["alice", "bob"]

        # --- Alice sends, donates -----------------------------------------------------
        go(alice, url + "/me/send")
        assert "member:alice" in alice.text_content("#signer")
        fill(alice, to="bob", amount="10", memo="thanks ☕ <script>")
        got = submit(alice)
        assert got["type"] == "transfer"
        assert balance(api, "member:alice") == 90
        assert balance(api, "member:bob") == 110
        # Too much: insufficient funds, shown at the amount, and nothing moved.
        fill(alice, to="bob", amount="1000")
        assert error_at(alice, "amount").startswith("Not enough funds: member:alice has 90 CU")
        assert balance(api, "member:alice") == 90

        go(alice, url + "/me/donate?cause=malaria")
        fill(alice, amount="5")
        submit(alice)
        assert balance(api, "member:alice") == 85
        assert balance(api, "cause:malaria") == 5

        # --- The market: Alice sells, Bob buys part, Alice cancels the rest -----------
        go(alice, url + "/me/sell")
        fill(alice, sell_amount="20", price_amount="300")
        got = submit(alice)
        offer_id = got["offer id"]
        assert balance(api, "member:alice") == 65
        # Bob needs USD: the operator deposits it (in the browser too).
        go(operator, url + "/operator/act/deposit")
        fill(operator, to="bob", asset="USD", amount="1000", external_ref="charge-1")
        submit(operator)
        assert balance(api, "member:bob", "USD") == 1000

        go(bob, url + f"/me/buy?offer_id={offer_id}")
        assert bob.input_value("#f-offer_id") == offer_id
        fill(bob, amount="10")
        submit(bob)
        fee = 150 * info["market_fee_bps"] // 10_000
        assert balance(api, "member:bob") == 120
        assert balance(api, "member:bob", "USD") == 850
        assert balance(api, "member:alice", "USD") == 150 - fee

        go(alice, url + f"/me/cancel?offer_id={offer_id}")
        submit(alice)
        assert balance(api, "member:alice") == 75
        assert api.offer(offer_id)["status"] != "open"

        # --- An API key: made in the browser, shown once, then revoked ----------------
        go(alice, url + "/me/keys/grant")
        fill(alice, label="laptop")
        got = submit(alice)
        secret = alice.text_content("#api-key-secret").strip()
        assert re.fullmatch(r"ubc_sk_[A-Za-z0-9_-]{43}", secret)
        account = f"{url}/api/accounts/member:alice"
        read = httpx.get(account, headers={"Authorization": f"Bearer {secret}"})
        assert read.status_code == 200
        go(alice, url + "/me/keys/revoke")
        fill(alice, key_hash=got["key hash"])
        submit(alice)
        read = httpx.get(account, headers={"Authorization": f"Bearer {secret}"})
        assert read.status_code == 401

        # --- A withdrawal: Alice asks, the operator countersigns ----------------------
        go(alice, url + "/me/withdraw")
        fill(alice, amount="100", external_ref="payout-1")
        got = submit(alice)
        withdrawal_id = got["withdrawal id"]
        assert got["status"] == "pending"
        assert balance(api, "member:alice", "USD") == 150 - fee  # nothing moved yet
        # The pending withdrawals are read through the operator's session (the token
        # travels once, in the sign-in POST): nothing to type into the page.
        operator.goto(url + "/operator/act/countersign")
        assert "/signin?next=" in operator.url
        sign_in(operator, url, live_server.operator_token, "/operator/act/countersign")
        operator.wait_for_selector("body[data-ready=yes]")
        operator.click(f"#pending button.use[data-id='{withdrawal_id}']")
        assert operator.input_value("#f-id") == withdrawal_id
        got = submit(operator)
        assert got["type"] == "withdrawal"
        assert balance(api, "member:alice", "USD") == 50 - fee
        assert operator.locator(f"#pending tr[data-id='{withdrawal_id}']").count() == 0

        # --- Bob, a steward, sends from the cause; Alice replaces her key --------------
        go(bob, url + "/me/send")
        fill(bob, to="alice", amount="2", **{"from": "cause:malaria"})
        submit(bob)
        assert balance(api, "cause:malaria") == 3
        assert balance(api, "member:alice") == 77
        old_keyid = api.member("alice")["keys"][0]["keyid"]
        go(alice, url + "/me/keys/rotate")
        alice.check("#f-confirm-yes")
        got = submit(alice)
        keys = api.member("alice")["keys"]
        current = [k["keyid"] for k in keys if k["current"]]
        assert current == [got["new key id"]]
        assert old_keyid not in current
        assert got["new key id"] in alice.text_content("#signer")
        go(alice, url + "/me/send")
        fill(alice, to="bob", amount="7")
        submit(alice)  # signed by the new key
        assert balance(api, "member:alice") == 70

        # --- Suspend, reinstate, change tier, close the epoch -------------------------
        for action, status in (("suspend", "suspended"), ("reinstate", "active")):
            go(operator, url + f"/operator/act/{action}?member=alice")
            fill(operator, reason="checking")
            submit(operator)
            assert api.member("alice")["status"] == status
        go(operator, url + "/operator/act/tier?member=alice")
        fill(operator, tier="pro")
        submit(operator)
        assert api.member("alice")["tier"] == "pro"
        go(operator, url + "/operator/act/epoch-close?epoch=1")
        submit(operator)
        assert api.ledger_info()["current_epoch"] in (None, 1)

        # --- No private key ever left a browser ------------------------------------------
        secrets = key_encodings(operator_seed, data / "operator.key")
        secrets += key_encodings(bytes(bob_key), bob_file)
        sent = assert_no_secret_sent([alice, operator, bob], secrets)
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
        # No dialog, no CSP violation, no injected script on any page of the three.
        for p in pages.values():
            assert_clean(p)
