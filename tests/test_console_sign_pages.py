"""The signing pages as pages: every form labelled, no inline script, prefills escaped,
usable by keyboard and at a phone's width, and errors shown next to their field."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx

from ubc.client import UbcClient
from ubc.console.actions import ACTIONS
from ubc.signing import generate_signing_key

from .conftest import LiveServer
from .console_helpers import sign_in

PAGES = ["/key", "/register"] + [a.path for a in ACTIONS]


class _Form(HTMLParser):
    """Collects inputs, labels and scripts of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[dict[str, str | None]] = []
        self.labels: set[str] = set()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []
        self.in_fieldset_label = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.handlers += [k for k in a if k.startswith("on")]
        if tag == "script":
            self.scripts.append(a)
        elif tag == "label":
            if a.get("for"):
                self.labels.add(a["for"] or "")
            else:
                self.in_fieldset_label += 1
        elif tag in ("input", "textarea", "select"):
            a["_wrapped"] = "yes" if self.in_fieldset_label else None
            self.inputs.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "label" and self.in_fieldset_label:
            self.in_fieldset_label -= 1


def test_every_signing_page_is_labelled_and_has_no_inline_script(
    live_server: LiveServer,
) -> None:
    with httpx.Client(base_url=live_server.url) as http:
        # Signed in as the operator (the countersign page reads through its session).
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/signin").text)
        assert csrf is not None
        http.post("/signin", data={"csrf": csrf[1], "secret": live_server.operator_token})
        for path in PAGES:
            response = http.get(path)
            assert response.status_code == 200, path
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert response.headers["x-frame-options"] == "DENY"
            form = _Form()
            form.feed(response.text)
            assert form.inputs, path
            for field in form.inputs:
                if field.get("type") == "hidden":
                    continue  # the sign-out form's CSRF token: nothing to label
                assert field.get("id") in form.labels or field.get("_wrapped"), (path, field)
            assert form.scripts == [
                {"type": "module", "src": live_server.url + "/console/static/js/actions.js"}
            ], path
            assert not form.handlers, (path, form.handlers)
        script = http.get("/console/static/js/ubc.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]


def test_query_parameters_prefill_fields_escaped(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as http:
        text = http.get("/me/send", params={"to": 'bob"><script>x()</script>'}).text
        assert "<script>x()" not in text
        assert 'value="bob&#34;&gt;&lt;script&gt;x()&lt;/script&gt;"' in text
        admit = http.get("/operator/act/admit?member=carol").text
        assert re.search(r'id="f-handle"[^>]*value="carol"', admit, re.S)
        # The countersign page reads through the operator's session: it has no token field.
        csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/signin").text)
        assert csrf is not None
        http.post("/signin", data={"csrf": csrf[1], "secret": live_server.operator_token})
        countersign = http.get('/operator/act/countersign?id=w1"><script>x()</script>').text
        assert "<script>x()" not in countersign
        assert 'value="w1&#34;&gt;&lt;script&gt;x()&lt;/script&gt;"' in countersign
        assert 'type="password"' not in countersign
        assert live_server.operator_token not in countersign


def test_keyboard_phone_width_and_errors_at_their_field(
    live_server: LiveServer, browser: Any, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.request_log = []
    page.on("request", lambda r: page.request_log.append(r.method))
    try:
        url = live_server.url
        # /key: a bad key file is refused in words at the field; nothing is kept.
        page.goto(url + "/key")
        page.wait_for_selector("body[data-ready=yes]")
        page.fill("#member-handle", "dora")
        page.fill("#member-text", "not a key")
        page.click("#import-member button[type=submit]")
        page.wait_for_selector("#member-file-error:not([hidden])")
        assert page.text_content("#member-file-error") == (
            "this is not a ubc key file (one line of base64)"
        )
        assert page.get_attribute("#held-member", "data-loaded") == "no"
        # A key that is not the ledger's operator key is refused as the operator's.
        page.fill("#operator-text", base64.b64encode(bytes(32)).decode())
        page.click("#import-operator button[type=submit]")
        page.wait_for_selector("#operator-file-error:not([hidden])")
        assert "not one of this ledger's operator keys" in page.text_content("#operator-file-error")
        assert page.get_attribute("#held-operator", "data-loaded") == "no"

        # /register by keyboard alone, at a phone's width: a taken handle is refused at
        # the handle field.
        with UbcClient(url, key=generate_signing_key()) as erin:
            erin.register("erin")
        page.goto(url + "/register")
        page.wait_for_selector("body[data-ready=yes]")
        page.focus("#f-handle")
        page.keyboard.type("erin")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "f-display_name"
        page.keyboard.press("Enter")  # submits the form
        page.wait_for_selector("#f-handle-error:not([hidden]), #form-error:not([hidden])")
        error = page.text_content("#f-handle-error")
        assert "erin" in error, error
        # Now a free handle: registered, the key made here and kept.
        page.fill("#f-handle", "dora")
        page.keyboard.press("Enter")
        page.wait_for_selector("#result[data-done=yes]")
        assert page.get_attribute("#signer", "data-loaded") == "yes"
        # Registering another handle would replace dora's key: refused, nothing sent.
        posts = len([r for r in page.request_log if r == "POST"])
        page.fill("#f-handle", "fred")
        page.keyboard.press("Enter")
        page.wait_for_selector("#f-handle-error:not([hidden])")
        assert "holds the key of member:dora" in page.text_content("#f-handle-error")
        assert len([r for r in page.request_log if r == "POST"]) == posts
        # Nothing is wider than the screen on any page (signed in as the operator, whose
        # session the countersign page reads through).
        sign_in(page, url, live_server.operator_token, "/operator")
        for path in PAGES:
            page.goto(url + path)
            page.wait_for_selector("body[data-ready=yes]")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 360, (path, width)
        # /key: forget the member key.
        page.goto(url + "/key")
        page.wait_for_selector("#held-member[data-loaded=yes]")
        page.click(".forget[data-role=member]")
        page.wait_for_selector("#held-member[data-loaded=no]")
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        context.close()
