"""The console's JavaScript signing library (static/js/ubc.js) against ubc.signing, in a
real browser: the same canonical JSON and PAE bytes, envelopes that verify in Python, and
keys that cannot be read back out of the browser."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from ubc.signing import (
    Envelope,
    canonical_json,
    key_id,
    pae,
    payload_type_for,
    sign_envelope,
    verified_keyids,
)

from .conftest import LiveServer

UBC_JS = "/console/static/js/ubc.js"

# Values whose canonical form is easy to get wrong: escapes, control characters, non-BMP
# characters (JCS sorts keys by UTF-16 code units, not code points), nesting, big integers.
PAYLOADS: list[Any] = [
    {"ledger": "test.ubc/ledger", "amount": 30, "memo": "thanks ☕"},
    {"b": 1, "a": 2, "A": 3, "_": 4, "é": 5, "\ue000": 6, "😀": 7, "aa": 8, "": 9},
    {"s": 'quote " backslash \\ slash / tab \t nl \n cr \r ff \f bs \b'},
    {"ctl": "\x00\x01\x07\x0b\x0e\x1f\x7f", "ls": "\u2028\u2029", "nbsp": "\xa0"},
    {"emoji": "👩‍💻🏳️‍🌈", "cjk": "中文", "combining": "e\u0301", "rtl": "שלום"},
    {"n": [0, -1, 1, 9007199254740991, -9007199254740991, True, False, None]},
    {"nested": {"z": [{"y": {"x": []}}, {}], "a": {"b": {"c": {"d": "deep"}}}}},
    {"allocations": {"pro": 250, "basic": 100}, "stewards": ["alice", "bob"]},
    {"html": "<script>alert(1)</script>&amp;", "unicode_escape_text": "\\u0041"},
    {},
]

TYPES = ["transfer", "member.register", "epoch.open", "apikey.grant", "x" * 200]

SEED = bytes(range(32))


@pytest.fixture
def ubc_page(live_server: LiveServer, page: Any) -> Any:
    page.goto(live_server.url + "/key")
    page.wait_for_selector("body[data-ready=yes]")
    return page


def _run(page: Any, body: str, arg: Any = None) -> Any:
    """Run ``body`` (an async function body with ``ubc`` and ``arg``) in the page."""
    script = (
        "async (arg) => { const ubc = await import('" + UBC_JS + "');\n"
        "const hex = (b) => ubc.hex(b);\n" + body + "\n}"
    )
    return page.evaluate(script, arg)


def test_canonical_json_and_pae_match_python_byte_for_byte(ubc_page: Any) -> None:
    # JSON transports the values exactly (strings with escapes, integers up to 2^53-1).
    results = _run(
        ubc_page,
        "return arg.map(([t, v]) => { const b = ubc.canonicalJson(v);"
        " return [hex(b), hex(ubc.pae(ubc.payloadTypeFor(t), b))]; });",
        [[TYPES[i % len(TYPES)], p] for i, p in enumerate(PAYLOADS)],
    )
    for i, (payload, (body_hex, pae_hex)) in enumerate(zip(PAYLOADS, results, strict=True)):
        expected = canonical_json(payload)
        assert bytes.fromhex(body_hex) == expected, (payload, bytes.fromhex(body_hex), expected)
        type_ = payload_type_for(TYPES[i % len(TYPES)])
        assert bytes.fromhex(pae_hex) == pae(type_, expected)


def test_canonical_json_refuses_what_python_refuses(ubc_page: Any) -> None:
    refused = _run(
        ubc_page,
        "const bad = [{a: 1.5}, {a: 2 ** 53}, {a: NaN}, {a: '\\ud800'}, {a: 'x\\udc00'}];"
        "return bad.map((v) => { try { ubc.canonicalJson(v); return null; }"
        " catch (e) { return e.message; } });",
    )
    assert all(refused), refused


def test_imported_cli_key_signs_the_documented_envelope_exactly(
    ubc_page: Any, tmp_path: Path
) -> None:
    """The key of docs/envelopes.md section 9 (seed 00..1f), imported from its CLI key file
    text, signs the transfer of that section into exactly the documented envelope."""
    key_text = base64.b64encode(SEED).decode() + "\n"
    payload = {
        "ledger": "ubc.example.org/ledger",
        "id": "6f1c2a8e-3b4d-4c5e-9f60-718293a4b5c6",
        "created_at": "2026-03-01T12:00:00Z",
        "actor": "member:alice",
        "from": "member:alice",
        "to": "member:bob",
        "asset": "CU",
        "amount": 30,
        "memo": "thanks ☕",
    }
    got = _run(
        ubc_page,
        "const held = await ubc.importKeyFile(arg.key, {handle: 'alice'});"
        "const env = await ubc.signEnvelope(ubc.payloadTypeFor('transfer'),"
        " ubc.canonicalJson(arg.payload), [held]);"
        "let exported = null;"
        "try { await crypto.subtle.exportKey('pkcs8', held.privateKey); exported = 'pkcs8'; }"
        " catch (e) { exported = e.name; }"
        "return {env, publicKey: held.publicKey, keyid: held.keyid, handle: held.handle,"
        " extractable: held.privateKey.extractable, exported};",
        {"key": key_text, "payload": payload},
    )
    python = sign_envelope(
        payload_type_for("transfer"), canonical_json(payload), [SigningKey(SEED)]
    )
    assert got["env"] == python.to_json()
    assert got["env"]["signatures"][0]["sig"] == (
        "lzzDpSuc8kwrjlEWgB/CbCLd6ZqenHn2isZlm1LnaeieocRUZrkzmcc6tLCK8NtQHVZ2gxPmljxkoINSwPCZDQ=="
    )
    assert got["publicKey"] == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert got["keyid"] == "56475aa75463474c"
    assert got["handle"] == "alice"
    assert got["extractable"] is False
    assert got["exported"] == "InvalidAccessError"


def test_a_key_made_in_the_browser_signs_envelopes_python_verifies(ubc_page: Any) -> None:
    got = _run(
        ubc_page,
        "const held = await ubc.generateKey();"
        "const env = await ubc.envelope('transfer', {from: 'member:a', to: 'member:b',"
        " asset: 'CU', amount: 5, memo: arg}, {origin: 'test.ubc/ledger', actor: 'member:a',"
        " signers: [held]});"
        "await ubc.saveKey('member', {...held, handle: 'a'});"
        "const back = await ubc.loadKey('member');"
        "const again = await ubc.signEnvelope(env.payloadType, ubc.b64decode(env.payload), [back]);"
        "let exported; try { await crypto.subtle.exportKey('jwk', back.privateKey);"
        " exported = 'jwk'; } catch (e) { exported = e.name; }"
        "return {env, again, publicKey: held.publicKey, keyid: held.keyid, exported,"
        " extractable: back.privateKey.extractable};",
        'ünïcode ☕ "quoted"',
    )
    public = base64.b64decode(got["publicKey"])
    assert got["keyid"] == key_id(public) == hashlib.sha256(public).digest()[:8].hex()
    for signed in (got["env"], got["again"]):  # before and after a trip through IndexedDB
        envelope = Envelope.from_json(signed)
        assert verified_keyids(envelope, {got["keyid"]: public}) == {got["keyid"]}
    payload = json.loads(Envelope.from_json(got["env"]).payload)
    assert canonical_json(payload) == Envelope.from_json(got["env"]).payload
    assert payload["memo"] == 'ünïcode ☕ "quoted"'
    assert payload["ledger"] == "test.ubc/ledger"
    assert payload["actor"] == "member:a"
    assert got["exported"] == "InvalidAccessError"
    assert got["extractable"] is False


def test_a_bad_key_file_is_refused_in_words(ubc_page: Any) -> None:
    errors = _run(
        ubc_page,
        "const out = []; for (const t of arg) { try { await ubc.importKeyFile(t); out.push(null); }"
        " catch (e) { out.push(e.message); } } return out;",
        ["not base64!", base64.b64encode(b"short").decode(), ""],
    )
    assert errors[0] == "this is not a ubc key file (one line of base64)"
    assert errors[1] == "a key file holds 32 bytes, this one 5"
    assert errors[2]
