"""The console's pages in a real browser (Debian's chromium through Playwright), against a
served ledger written through the real API: the public pages, a receipt checked, a
member's and the operator's pages, sign-in and its cookie, CSRF, escaping, phone width.

One seeded ledger per engine, one flow per test (the setup is the slow part). On a
failure, a screenshot of every main page is saved under the test's tmp dir."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ubc.cli import app as cli
from ubc.journal.checkpoint import format_tlog_proof, parse_tlog_proof
from ubc.signing import NoteVerifier

from .conftest import LiveServer, make_data_dir, run_server
from .console_helpers import assert_clean, screenshots_on_failure, sign_in, watch
from .console_seed import XSS, Seeded, close, models_file, seed

PUBLIC = ["/", "/checkpoints", "/epochs", "/causes", "/market", "/receipt", "/signin"]
MEMBER = ["/me", "/me/history", "/me/spend", "/me/donations", "/me/market", "/me/keys"]
OPERATOR = ["/operator", "/operator/members", "/operator/epochs", "/operator/report"]


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[LiveServer, Seeded]]:
    """A served ledger (with the local embedding model) and its seeded story."""
    data = make_data_dir(tmp_path / "data")
    with run_server(db_url, data, models_file=models_file(tmp_path)) as server:
        seeded = seed(server)
        try:
            yield server, seeded
        finally:
            close(seeded)


def test_public_pages_and_a_receipt(
    served: tuple[LiveServer, Seeded], page: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, seeded = served
    monkeypatch.setattr("ubc.console.routes.HISTORY_ROWS", 3)
    watch(page)
    with screenshots_on_failure({"current": page}, tmp_path / "shots", server.url, tuple(PUBLIC)):
        vkey = server.app.state.ledger_info["vkey"]
        response = page.goto(server.url + "/")
        assert response.headers["x-frame-options"] == "DENY"
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert re.fullmatch(r"\d+ s", page.text_content("#checkpoint-age").strip())

        # Checkpoints: the latest verifies with the vkey alone; one tree head per batch.
        page.goto(server.url + "/checkpoints")
        body = NoteVerifier.from_vkey(vkey).verify(page.text_content("#checkpoint"))
        size = int(body.splitlines()[1])
        first = page.locator("#heads tbody tr").first.locator("td")
        assert int(first.nth(0).text_content()) == size
        assert first.nth(1).text_content().strip() == body.splitlines()[2]
        # Paged: the next page goes on with the batch just before the last one shown.
        column = "#heads tbody tr td:nth-child({})"
        sizes = [int(t) for t in page.locator(column.format(1)).all_text_contents()]
        counts = [int(t) for t in page.locator(column.format(3)).all_text_contents()]
        assert len(sizes) == 3
        assert all(a - n == b for a, n, b in zip(sizes, counts, sizes[1:], strict=False))
        page.click("text=Older")
        older = [int(t) for t in page.locator(column.format(1)).all_text_contents()]
        assert older[0] == sizes[-1] - counts[-1]

        # Epochs: members and totals per tier.
        page.goto(server.url + "/epochs")
        tiers = page.locator("#epoch-1 table.tiers tbody tr")
        assert [" ".join(tiers.nth(i).inner_text().split()) for i in range(2)] == [
            "basic 2000 2 4000",
            "pro 5000 1 5000",
        ]

        # Causes: what was given, by how many, and what was spent.
        page.goto(server.url + "/causes")
        cause = page.locator("#cause-open-research").inner_text()
        assert "Open research" in cause
        assert "400 CU" in cause
        assert "1 donor" in cause

        # Market: the rest of carol's offer; a trade, without its parties (journal restricted).
        page.goto(server.url + "/market")
        offers = page.locator("#offers tbody").inner_text()
        assert "member:carol" in offers
        assert "600 CU" in offers
        assert "300 USD" in offers
        trades = page.locator("#trades tbody").inner_text()
        assert "400 CU" in trades
        assert "200 USD" in trades
        assert "member:bob" not in trades

        # A receipt from `ubc proof get`, uploaded: included under the current checkpoint.
        receipt = tmp_path / "donation.tlog-proof"
        result = CliRunner().invoke(
            cli,
            [
                "proof",
                "get",
                str(seeded.donation_seq),
                "--server",
                server.url,
                "--token",
                server.operator_token,
                "-o",
                str(receipt),
            ],
            env={"UBC_TOKEN": None, "XDG_CONFIG_HOME": str(tmp_path / "xdg")},
        )
        assert result.exit_code == 0, result.output
        page.goto(server.url + "/receipt")
        page.set_input_files("#file", str(receipt))
        page.click("#receipt-form button")
        verdict = page.text_content("#verdict")
        assert verdict.strip().startswith("Included.")
        assert f"Entry {seeded.donation_seq} is in the journal" in verdict
        # A receipt whose entry was altered: said plainly, not included.
        parsed = parse_tlog_proof(receipt.read_text())
        assert parsed.extra is not None
        assert b'"amount":400' in parsed.extra
        forged = tmp_path / "forged.tlog-proof"
        altered = parsed.extra.replace(b'"amount":400', b'"amount":401', 1)
        forged.write_text(
            format_tlog_proof(parsed.index, parsed.proof, parsed.checkpoint, extra=altered)
        )
        page.goto(server.url + "/receipt")
        page.set_input_files("#file", str(forged))
        page.click("#receipt-form button")
        assert page.text_content("#verdict").strip().startswith("Not included.")
        # Pasted garbage: an error in words.
        page.goto(server.url + "/receipt")
        page.fill("#proof", "hello")
        page.click("#receipt-form button")
        assert "not a tlog-proof" in page.text_content("#verdict")
        assert_clean(page)


def test_member_pages_sign_in_cookie_csrf_and_escaping(
    served: tuple[LiveServer, Seeded], page: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, seeded = served
    monkeypatch.setattr("ubc.console.member.PAGE_SIZE", 2)
    watch(page)
    secret = seeded.api_keys["alice"]
    with screenshots_on_failure({"current": page}, tmp_path / "shots", server.url, tuple(MEMBER)):
        # Without a session the member's pages send to the sign-in page, and back after it.
        page.goto(server.url + "/me/spend")
        assert page.url == server.url + "/signin?next=%2Fme%2Fspend"
        page.fill("#secret", "ubc_sk_not-a-key")
        page.click("form.form button[type=submit]")
        assert "Not signed in" in page.text_content("#secret-error")
        page.fill("#secret", secret)
        page.click("form.form button[type=submit]")
        page.wait_for_url(server.url + "/me/spend")

        # The key travelled once, in the sign-in POST body; never in a URL or a header.
        carrying = [r for r in page.sent if secret in (r["body"] or b"").decode(errors="replace")]
        assert [(r["method"], r["url"]) for r in carrying] == [("POST", server.url + "/signin")]
        assert not [r for r in page.sent if secret in r["url"] or secret in str(r["headers"])]
        # The cookie: HttpOnly, SameSite=Strict, not the key, invisible to scripts.
        (cookie,) = [c for c in page.context.cookies() if c["name"] == "ubc_session"]
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"
        assert secret not in cookie["value"]
        assert "ubc_session" not in page.evaluate("document.cookie")

        # Model spend: the call through the OpenAI SDK, by model and by day, as charts.
        assert "all-minilm-l6-v2" in page.locator("#by-model").inner_text()
        row = page.locator("#by-model tbody tr").first.locator("td")
        tokens, cost = int(row.nth(2).text_content()), int(row.nth(4).text_content())
        assert tokens > 0
        assert cost == tokens
        assert page.locator("#chart-1 svg rect.bar").count() == 1
        assert page.locator("#chart-3 svg rect.bar").count() == 1

        # Balances: available and pending per asset, and the links to the signing pages.
        page.goto(server.url + "/me")
        assert page.text_content("#account").startswith("member:alice")
        available = int(page.text_content("#balances tr[data-asset=CU] .available"))
        assert available == 2000 - 150 - cost
        assert page.get_attribute("main a[href='/me/send']", "class") == "button"

        # History, a page at a time; the <script> memo is text, shown as it was written.
        page.goto(server.url + "/me/history")
        assert page.locator("#history tbody tr").count() == 2
        page.click("#older")
        page.wait_for_url(re.compile(r".*/me/history\?cursor=.*"))
        memos = []
        while True:
            memos += page.locator("#history td.memo").all_text_contents()
            if page.locator("#older").count() == 0:
                break
            page.click("#older")
        assert XSS in memos

        # API keys, with a revoke link to the signing page; no donation; no withdrawal.
        page.goto(server.url + "/me/keys")
        assert "alice's laptop" in page.locator("#apikeys").inner_text()
        assert (
            page.locator("#apikeys a", has_text="Revoke")
            .get_attribute("href")
            .startswith("/me/keys/revoke?key_hash=")
        )
        page.goto(server.url + "/me/donations")
        assert "No donation yet." in page.locator("#donations").inner_text()

        # CSRF: a sign-out without the token, or from another origin, is refused.
        forged = page.request.post(server.url + "/signout", form={"csrf": "guess"})
        assert forged.status == 403
        token = page.get_attribute("meta[name=csrf-token]", "content")
        foreign = page.request.post(
            server.url + "/signout",
            form={"csrf": token},
            headers={"Origin": "https://evil.example"},
        )
        assert foreign.status == 403
        page.goto(server.url + "/me")
        assert page.url == server.url + "/me"  # still signed in

        # At a phone's width nothing overflows the page sideways.
        page.set_viewport_size({"width": 375, "height": 740})
        for path in ("/me", "/me/history", "/me/spend", "/market"):
            page.goto(server.url + path)
            assert page.evaluate("document.documentElement.scrollWidth") <= 375, path
        page.set_viewport_size({"width": 1280, "height": 800})

        # Signing out forgets the session.
        page.goto(server.url + "/me")
        page.click("#signout")
        page.wait_for_url(server.url + "/")
        assert not [c for c in page.context.cookies() if c["name"] == "ubc_session"]
        page.goto(server.url + "/me")
        assert page.url.startswith(server.url + "/signin")

        # Bob's pages: his donation with its journal entry, his trade, his name as text.
        sign_in(page, server.url, seeded.api_keys["bob"], "/me")
        assert page.text_content("h1") == XSS
        page.goto(server.url + "/me/donations")
        donations = page.locator("#donations").inner_text()
        assert "cause:open-research" in donations
        assert str(seeded.donation_seq) in donations
        # Its receipt, downloaded from the console, checks out on the receipt page.
        with page.expect_download() as download:
            page.click("#donations a.receipt")
        assert download.value.suggested_filename == f"proof-{seeded.donation_seq}.tlog-proof"
        page.goto(server.url + "/receipt")
        page.set_input_files("#file", download.value.path())
        page.click("#receipt-form button")
        assert page.text_content("#verdict").strip().startswith("Included.")
        # Not the receipt of an entry that is not bob's (entry 0: the ledger's configuration).
        assert page.goto(server.url + "/me/receipts/0.tlog-proof").status == 404
        page.goto(server.url + "/me/market")
        assert "bought" in page.locator("#my-trades").inner_text()
        assert_clean(page)


def test_operator_pages(served: tuple[LiveServer, Seeded], page: Any, tmp_path: Path) -> None:
    server, seeded = served
    watch(page)
    with screenshots_on_failure({"current": page}, tmp_path / "shots", server.url, tuple(OPERATOR)):
        # A member's key does not open the operator's pages.
        sign_in(page, server.url, seeded.api_keys["carol"], "/me")
        response = page.goto(server.url + "/operator")
        assert response.status == 403

        # Nor the report's CSV.
        assert page.request.get(server.url + "/operator/report.csv?epoch=1").status == 403
        page.click("#signout")
        page.wait_for_url(server.url + "/")

        # The operator signs in by keyboard alone: to the field, type, Enter.
        page.goto(server.url + "/signin")
        page.focus("#secret")
        page.keyboard.type(server.operator_token)
        page.keyboard.press("Enter")
        page.wait_for_url(server.url + "/operator")
        checkpoint = seeded.operator.checkpoint()
        size = int(page.text_content("#journal-size").split()[0])
        assert size == int(checkpoint.splitlines()[1])
        assert "s" in page.text_content("#checkpoint-age")
        assert "entries in the last minute" in page.text_content("#write-rate")
        assert page.text_content("#open-holds").strip()

        # Members: the XSS name is text; dave waits, with an Admit link to the signing page.
        page.goto(server.url + "/operator/members")
        assert page.text_content("#members tr[data-handle=bob] td:nth-child(2)") == XSS
        admit = page.locator("#members tr[data-handle=dave] a")
        assert admit.text_content() == "Admit"
        assert admit.get_attribute("href") == "/operator/act/admit?handle=dave"
        page.fill("#q", "car")
        page.click("form.filters button")
        assert page.locator("#members tbody tr").count() == 1
        page.goto(server.url + "/operator/members?status=pending")
        assert page.locator("#members tbody tr").all_inner_texts()[0].startswith("dave")

        # Epochs, and the report as charts, with members below a threshold and the CSV.
        page.goto(server.url + "/operator/epochs")
        assert "open" in page.text_content("#epoch-1 .status")
        page.goto(server.url + "/operator/report?epoch=1&below=1")
        assert page.locator(".charts figure").count() == 4
        assert page.locator("#chart-1 svg rect.bar").count() == 7
        below = page.locator("#below-members").inner_text()
        assert "member:bob" in below
        assert "member:carol" in below
        assert "member:alice" in below
        tiers = page.locator("#by-tier").inner_text()
        assert "basic" in tiers
        assert "pro" in tiers
        with page.expect_download() as download:
            page.click("#csv")
        csv = Path(download.value.path()).read_text().splitlines()
        assert csv[0].startswith("address,allocated,used")
        assert csv[-1].startswith("total,9000,")
        # A bad threshold: said in words, next to its field.
        page.goto(server.url + "/operator/report?epoch=1&below=lots")
        assert page.text_content("#below-error") == "A percent such as 10 or 12.5."
        assert page.get_attribute("#below", "aria-invalid") == "true"

        # Causes and pending withdrawals, with links to the signing pages.
        page.goto(server.url + "/operator/causes")
        assert "open-research" in page.locator("#causes").inner_text()
        page.goto(server.url + "/operator/withdrawals")
        pending = page.locator("#pending-withdrawals tbody tr")
        assert "member:carol" in pending.inner_text()
        assert "bank-0001" in pending.inner_text()
        assert (
            pending.locator("a").get_attribute("href").startswith("/operator/act/countersign?id=")
        )

        # The market shows who traded to the operator.
        page.goto(server.url + "/market")
        assert "member:bob" in page.locator("#trades").inner_text()
        # At a phone's width nothing overflows sideways.
        page.set_viewport_size({"width": 375, "height": 740})
        for path in [*OPERATOR, "/operator/causes", "/operator/withdrawals", *PUBLIC]:
            page.goto(server.url + path)
            assert page.evaluate("document.documentElement.scrollWidth") <= 375, path
        assert_clean(page)
