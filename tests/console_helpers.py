"""What the console's browser tests share: pages that record what they send, a watch on
dialogs, CSP violations and injected scripts, screenshots on failure, sign-in, the
signing pages' forms, and the search of every request for a private key."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

from nacl.signing import SigningKey

from ubc.client import UbcClient

# Every CSP violation a page sees is said on its console, where ``watch`` hears it (the
# browser's own "Refused to ..." line says it too; this also catches report-only cases).
_CSP_LISTENER = (
    "document.addEventListener('securitypolicyviolation', (e) =>"
    " console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI));"
)


def watch(page: Any) -> Any:
    """Record on ``page`` the dialogs it opened (``page.dialogs``) and every refusal of
    the Content-Security-Policy (``page.refused``); see :func:`assert_clean`."""
    page.dialogs = []
    page.refused = []
    page.context.add_init_script(_CSP_LISTENER)
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on(
        "console",
        lambda m: (
            page.refused.append(m.text)
            if "Security Policy" in m.text or "CSP violation" in m.text
            else None
        ),
    )
    return page


def assert_clean(page: Any) -> None:
    """No dialog, no CSP violation, no injected script ran."""
    assert not page.dialogs, page.dialogs
    assert not page.refused, page.refused
    assert page.evaluate("window.__xss === undefined"), "an injected script ran"


def recorded(browser: Any, **options: Any) -> Any:
    """A new browser context and page that keeps every request it sends in ``page.sent``
    (as the ``page`` fixture does), watched (:func:`watch`)."""
    context = browser.new_context(**options)
    page = context.new_page()
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: sent.append(
            {"method": r.method, "url": r.url, "headers": r.headers, "body": r.post_data_buffer}
        ),
    )
    page.sent = sent
    return watch(page)


@contextlib.contextmanager
def screenshots_on_failure(
    pages: dict[str, Any], out: Path, base_url: str = "", paths: tuple[str, ...] = ()
) -> Iterator[None]:
    """Run a flow; if it fails, save each page as it is and, with ``paths``, each of those
    main pages as the first page shows them, as PNG files under ``out``."""
    try:
        yield
    except BaseException:
        out.mkdir(parents=True, exist_ok=True)
        for name, p in pages.items():
            with contextlib.suppress(Exception):
                p.screenshot(path=str(out / f"failure-{name}.png"), full_page=True)
        first = next(iter(pages.values()), None)
        for path in paths:
            with contextlib.suppress(Exception):
                first.goto(base_url + path)
                name = path.strip("/").replace("/", "-") or "home"
                first.screenshot(path=str(out / f"failure-page-{name}.png"), full_page=True)
        raise


def sign_in(page: Any, url: str, secret: str, expect: str) -> None:
    """Sign in on /signin (the secret goes once, in the POST body); wait for ``expect``."""
    page.goto(url + "/signin?next=" + expect.replace("/", "%2F").replace("?", "%3F"))
    page.fill("#secret", secret)
    page.click("form.form button[type=submit]")
    page.wait_for_url(url + expect)


def go(page: Any, url: str) -> None:
    """Open a signing page and wait until its script is ready."""
    page.goto(url)
    page.wait_for_selector("body[data-ready=yes]")


def submit(page: Any, form: str = "#action-form") -> dict[str, str]:
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


def error_at(page: Any, field: str) -> str:
    """Submit the form expecting the API's error next to ``field``; its text."""
    page.click("#action-form button[type=submit]")
    page.wait_for_selector(f"#f-{field}-error:not([hidden])")
    text: str = page.text_content(f"#f-{field}-error")
    return text


def fill(page: Any, **fields: str) -> None:
    for name, value in fields.items():
        page.fill(f"#f-{name}", value)


def import_key(page: Any, url: str, role: str, key_file: Path, handle: str = "") -> None:
    """Import a key file the CLI wrote into the browser, on /key."""
    go(page, url + "/key")
    if handle:
        page.fill("#member-handle", handle)
    page.set_input_files(f"#{role}-file", str(key_file))
    page.click(f"#import-{role} button[type=submit]")
    page.wait_for_selector(f"#held-{role}[data-loaded=yes]")


def key_encodings(seed: bytes, key_file: Path | None = None) -> list[bytes]:
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
    if key_file is not None:
        text = key_file.read_bytes()
        spellings += [text, text.strip()]
    # A JSON byte array, as a careless serialization of a Uint8Array would spell it.
    spellings.append(",".join(str(b) for b in seed).encode())
    return spellings


def assert_no_secret_sent(pages: list[Any], secrets: list[bytes]) -> int:
    """No request any of ``pages`` sent carries one of ``secrets`` (in its URL, headers or
    body, raw or percent-encoded); the number of requests searched."""
    count = 0
    for p in pages:
        for request in p.sent:
            haystacks = [request["url"].encode(), request["body"] or b""]
            haystacks += [f"{k}: {v}".encode() for k, v in request["headers"].items()]
            for hay in haystacks:
                for secret in secrets:
                    assert secret not in hay, (request["method"], request["url"])
                    assert quote_from_bytes(secret, safe="").encode() not in hay
            count += 1
    return count


def balance(api: UbcClient, address: str, asset: str = "CU") -> int:
    """The available balance of an account, read through the API."""
    for b in api.balance(address)["balances"]:
        if b["asset"] == asset:
            return int(b["available"])
    return 0
