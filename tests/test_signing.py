"""Tests for ubc.signing: keys, canonical JSON, strict payload parsing, DSSE envelopes.

Pure tests: no database, no network. The fixed vectors pin the wire format of DESIGN.md
section 4 so that an accidental change to PAE, base64 or key ids shows up here first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from ubc.signing import (
    MAX_DEPTH,
    Envelope,
    EnvelopeFormatError,
    PayloadError,
    Signature,
    add_signature,
    canonical_json,
    decode_public_key,
    encode_public_key,
    generate_signing_key,
    generate_token,
    is_canonical,
    key_id,
    load_signing_key,
    pae,
    parse_payload,
    payload_type_for,
    public_key_bytes,
    seed_b64,
    sign_envelope,
    signing_key_from_seed_b64,
    type_name,
    verified_keyids,
    write_signing_key,
    write_token,
)

# --- fixed vectors -------------------------------------------------------------------------
#
# How these were made (once, then pasted here): SigningKey(bytes(range(1, 33))) and
# SigningKey(bytes(range(33, 65))) from PyNaCl; the payload is canonical_json() of the dict in
# TRANSFER; the envelopes are sign_envelope(payload_type_for(...), PAYLOAD, keys) serialized
# with canonical_json(env.to_json()). Ed25519 is deterministic (RFC 8032), so the same seed
# and bytes always give the same signature. The Ed25519 implementation itself is pinned
# separately against RFC 8032 test 1 below, and key ids against a plain hashlib computation.

SEED_A = bytes(range(1, 33))
SEED_B = bytes(range(33, 65))
KEY_A = SigningKey(SEED_A)
KEY_B = SigningKey(SEED_B)
PK_A_B64 = "ebVWLo/mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmQ="
PK_B_B64 = "5/FioQvsVZr+oZXk3OhLaVaNXSywlj60RsBoXisX8vA="
KEYID_A = "65b60673d6ed884b"
KEYID_B = "c945cbf2a5602002"

TRANSFER: dict[str, Any] = {
    "ledger": "ubc.example.org/ledger",
    "id": "00000000-0000-4000-8000-000000000001",
    "created_at": "2025-01-01T00:00:00Z",
    "actor": "member:alice",
    "from": "member:alice",
    "to": "cause:malaria-research",
    "asset": "CU",
    "amount": 1000,
}
PAYLOAD = (
    b'{"actor":"member:alice","amount":1000,"asset":"CU","created_at":"2025-01-01T00:00:00Z",'
    b'"from":"member:alice","id":"00000000-0000-4000-8000-000000000001",'
    b'"ledger":"ubc.example.org/ledger","to":"cause:malaria-research"}'
)
PAYLOAD_B64 = (
    "eyJhY3RvciI6Im1lbWJlcjphbGljZSIsImFtb3VudCI6MTAwMCwiYXNzZXQiOiJDVSIsImNyZWF0ZWRfYXQiOiIy"
    "MDI1LTAxLTAxVDAwOjAwOjAwWiIsImZyb20iOiJtZW1iZXI6YWxpY2UiLCJpZCI6IjAwMDAwMDAwLTAwMDAtNDAw"
    "MC04MDAwLTAwMDAwMDAwMDAwMSIsImxlZGdlciI6InViYy5leGFtcGxlLm9yZy9sZWRnZXIiLCJ0byI6ImNhdXNl"
    "Om1hbGFyaWEtcmVzZWFyY2gifQ=="
)
TRANSFER_ENVELOPE_JSON = (
    '{"payload":"' + PAYLOAD_B64 + '",'
    '"payloadType":"application/vnd.ubc.transfer+json",'
    '"signatures":[{"keyid":"65b60673d6ed884b",'
    '"sig":"swl2MXtLge8Ai2tumHtSDW1We8+FvB23LMauohXsZfe83buhu9j05bG0RsW/Xuj2xnrAPfOobCk+oOprgJ/4DQ=="}]}'
)
WITHDRAWAL_ENVELOPE_JSON = (
    '{"payload":"' + PAYLOAD_B64 + '",'
    '"payloadType":"application/vnd.ubc.withdrawal+json",'
    '"signatures":[{"keyid":"65b60673d6ed884b",'
    '"sig":"DgwvqhG4wPOw/fqNEw20zlf5gsEVpfWrc1uWbXaRQG/J7IDSGmnXFyMVHBMi8hNF+A5B3oYFuSZNKq0zP3gmBA=="},'
    '{"keyid":"c945cbf2a5602002",'
    '"sig":"juQuPmwW4Pk2KWIw0oRiui1onA+Z9Pq/wLbQQCmAm4NJm/5xxTZOI7t6TaKnxDtUas0R0pJn+Q85oMxOg01BAw=="}]}'
)


def _pk(key: SigningKey) -> bytes:
    return public_key_bytes(key)


def _keys(*keys: SigningKey) -> dict[str, bytes]:
    return {key_id(_pk(k)): _pk(k) for k in keys}


# --- keys ----------------------------------------------------------------------------------


def test_ed25519_matches_rfc8032_test_1() -> None:
    # RFC 8032 section 7.1, TEST 1 (empty message): pins PyNaCl to the standard.
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e"
        "39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    key = SigningKey(secret)
    assert _pk(key) == public
    assert key.sign(b"").signature == signature


def test_public_key_and_key_id_vectors() -> None:
    assert encode_public_key(_pk(KEY_A)) == PK_A_B64
    assert encode_public_key(_pk(KEY_B)) == PK_B_B64
    assert key_id(_pk(KEY_A)) == KEYID_A
    assert key_id(_pk(KEY_B)) == KEYID_B
    # Independent computation of the contract: hex of SHA-256(pk)[:8].
    assert key_id(bytes(32)) == hashlib.sha256(bytes(32)).hexdigest()[:16] == "66687aadf862bd77"


def test_key_id_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        key_id(b"\x00" * 31)


def test_public_key_round_trip_and_strict_decode() -> None:
    pk = _pk(generate_signing_key())
    assert decode_public_key(encode_public_key(pk)) == pk
    assert decode_public_key(PK_A_B64) == _pk(KEY_A)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "32 bytes"),
        (base64.b64encode(bytes(31)).decode(), "32 bytes"),
        (base64.b64encode(bytes(33)).decode(), "32 bytes"),
        (PK_A_B64.rstrip("="), "base64"),  # missing padding
        (PK_A_B64 + "\n", "base64"),  # whitespace is not base64
        (PK_A_B64.replace("/", "_"), "base64"),  # urlsafe alphabet
        ("ebVWLo/mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmR=", "canonical"),  # non-zero pad bits
        ("é" * 44, "base64"),
    ],
)
def test_decode_public_key_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode_public_key(text)


def test_seed_round_trip() -> None:
    assert seed_b64(KEY_A) == "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
    assert bytes(signing_key_from_seed_b64(seed_b64(KEY_A))) == SEED_A
    assert bytes(signing_key_from_seed_b64("  " + seed_b64(KEY_A) + "\n")) == SEED_A


def test_write_and_load_signing_key(tmp_path: Path) -> None:
    path = tmp_path / "operator.key"
    write_signing_key(path, KEY_A)
    assert path.read_text() == seed_b64(KEY_A) + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes(load_signing_key(path)) == SEED_A


def test_key_file_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)  # would strip the owner's write bit if honoured
    try:
        write_signing_key(tmp_path / "k", KEY_A)
        write_token(tmp_path / "t")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o600


def test_write_signing_key_never_overwrites(tmp_path: Path) -> None:
    # Rotation writes a new key file; it must never clobber the old one.
    path = tmp_path / "member.key"
    write_signing_key(path, KEY_A)
    with pytest.raises(FileExistsError):
        write_signing_key(path, KEY_B)
    assert bytes(load_signing_key(path)) == SEED_A


def test_write_signing_key_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "ledger.key"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_signing_key(link, KEY_A)
    assert not target.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not base64!\n",
        base64.b64encode(bytes(31)) + b"\n",
        base64.b64encode(bytes(64)) + b"\n",
        b"\xff\xfe\n",
        seed_b64(KEY_A).encode() + b"\n" + seed_b64(KEY_B).encode() + b"\n",
    ],
)
def test_load_signing_key_rejects_malformed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.key"):
        load_signing_key(path)


def test_tokens(tmp_path: Path) -> None:
    token = generate_token()
    assert token.startswith("ubc_tok_")
    body = token.removeprefix("ubc_tok_")
    assert "=" not in body
    assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) == 32
    assert generate_token() != token

    path = tmp_path / "auditor.token"
    written = write_token(path)
    assert path.read_text() == written + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_token(path)
    assert path.read_text() == written + "\n"


# --- PAE and payload types -----------------------------------------------------------------


def test_pae_dsse_spec_example() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", b"") == b"DSSEv1 3 t\xc3\xa9 0 "


def test_payload_type_names() -> None:
    assert payload_type_for("transfer") == "application/vnd.ubc.transfer+json"
    assert payload_type_for("member.register") == "application/vnd.ubc.member.register+json"
    assert type_name("application/vnd.ubc.ledger.genesis+json") == "ledger.genesis"
    assert type_name("application/vnd.in-toto+json") is None
    assert type_name("application/vnd.ubc.+json") is None
    assert type_name("application/vnd.ubc.Transfer+json") is None
    with pytest.raises(ValueError, match="invalid payload type name"):
        payload_type_for("Transfer")


# --- envelopes -----------------------------------------------------------------------------


def test_envelope_vector_single_signature() -> None:
    assert canonical_json(TRANSFER) == PAYLOAD
    env = sign_envelope(payload_type_for("transfer"), PAYLOAD, [KEY_A])
    assert canonical_json(env.to_json()).decode() == TRANSFER_ENVELOPE_JSON
    parsed = Envelope.from_json(json.loads(TRANSFER_ENVELOPE_JSON))
    assert parsed == env
    assert verified_keyids(parsed, _keys(KEY_A)) == {KEYID_A}


def test_envelope_vector_two_signatures() -> None:
    env = sign_envelope(payload_type_for("withdrawal"), PAYLOAD, [KEY_A, KEY_B])
    assert canonical_json(env.to_json()).decode() == WITHDRAWAL_ENVELOPE_JSON
    parsed = Envelope.from_json(json.loads(WITHDRAWAL_ENVELOPE_JSON))
    assert verified_keyids(parsed, _keys(KEY_A, KEY_B)) == {KEYID_A, KEYID_B}
    # Only keys the verifier knows count.
    assert verified_keyids(parsed, _keys(KEY_B)) == {KEYID_B}
    assert verified_keyids(parsed, {}) == frozenset()


def test_add_signature_cosigns() -> None:
    env = sign_envelope(payload_type_for("withdrawal"), PAYLOAD, [KEY_A])
    both = add_signature(env, KEY_B)
    assert [s.keyid for s in both.signatures] == [KEYID_A, KEYID_B]
    assert canonical_json(both.to_json()).decode() == WITHDRAWAL_ENVELOPE_JSON
    with pytest.raises(ValueError, match="already signed"):
        add_signature(both, KEY_A)


def test_sign_envelope_needs_keys() -> None:
    with pytest.raises(ValueError, match="signing keys"):
        sign_envelope(payload_type_for("transfer"), PAYLOAD, [])
    with pytest.raises(ValueError, match="already signed"):
        sign_envelope(payload_type_for("transfer"), PAYLOAD, [KEY_A, KEY_A])


def test_tampered_payload_fails() -> None:
    env = sign_envelope(payload_type_for("transfer"), PAYLOAD, [KEY_A, KEY_B])
    tampered = Envelope(env.payload_type, PAYLOAD.replace(b"1000", b"9000"), env.signatures)
    assert verified_keyids(tampered, _keys(KEY_A, KEY_B)) == frozenset()


def test_changed_payload_type_fails() -> None:
    # The type is bound by PAE: a transfer signature cannot be replayed as another type.
    env = sign_envelope(payload_type_for("transfer"), PAYLOAD, [KEY_A])
    retyped = Envelope(payload_type_for("withdrawal"), env.payload, env.signatures)
    assert verified_keyids(retyped, _keys(KEY_A)) == frozenset()


def test_tampered_signature_fails() -> None:
    env = sign_envelope(payload_type_for("transfer"), PAYLOAD, [KEY_A])
    sig = env.signatures[0]
    flipped = bytes([sig.sig[0] ^ 1]) + sig.sig[1:]
    for bad in (flipped, sig.sig[:63], sig.sig + b"\x00", b"", bytes(64)):
        env2 = Envelope(env.payload_type, env.payload, (Signature(KEYID_A, bad),))
        assert verified_keyids(env2, _keys(KEY_A)) == frozenset()


def test_signature_under_wrong_keyid_fails() -> None:
    # B's signature labelled with A's key id is checked against A's key, and fails.
    env = sign_envelope(payload_type_for("transfer"), PAYLOAD, [KEY_B])
    relabelled = Envelope(
        env.payload_type, env.payload, (Signature(KEYID_A, env.signatures[0].sig),)
    )
    assert verified_keyids(relabelled, _keys(KEY_A, KEY_B)) == frozenset()


def test_mapping_with_mismatched_keyid_is_not_trusted() -> None:
    env = sign_envelope(payload_type_for("transfer"), PAYLOAD, [KEY_A])
    # The key under KEYID_B really is key A, so A's signature would verify; it must not
    # count as B's.
    relabelled = Envelope(
        env.payload_type, env.payload, (Signature(KEYID_B, env.signatures[0].sig),)
    )
    assert verified_keyids(relabelled, {KEYID_B: _pk(KEY_A)}) == frozenset()
    assert verified_keyids(env, {KEYID_A: b"short"}) == frozenset()


def _valid_json() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(WITHDRAWAL_ENVELOPE_JSON)
    return result


def _with(**changes: Any) -> dict[str, Any]:
    obj = _valid_json()
    obj.update(changes)
    return obj


def _sig(**changes: Any) -> dict[str, Any]:
    obj = _valid_json()
    obj["signatures"][0].update(changes)
    return obj


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ([], "must be a JSON object"),
        ("envelope", "must be a JSON object"),
        ({}, "missing"),
        ({k: v for k, v in _valid_json().items() if k != "payload"}, "missing payload"),
        (_with(extra=1), "unknown field"),
        (_with(payloadType=1), "payloadType"),
        (_with(payloadType=""), "payloadType"),
        (_with(payloadType="\ud800"), "payloadType"),
        (_with(payload=None), "payload must be a base64 string"),
        (_with(payload="not base64"), "payload is not valid standard base64"),
        (_with(payload=PAYLOAD_B64.rstrip("=")), "payload is not valid standard base64"),
        (_with(payload="QR=="), "payload is not canonical"),
        (_with(signatures={}), "signatures must be an array"),
        (_with(signatures=[]), "1 to 8 signatures"),
        (_with(signatures=[{"keyid": KEYID_A, "sig": "AA=="}] * 9), "1 to 8 signatures"),
        (_with(signatures=["x"]), r"signatures\[0\] must be an object"),
        (_sig(keyid=None), "keyid must be 16 lowercase hex"),
        (_sig(keyid=KEYID_A.upper()), "keyid must be 16 lowercase hex"),
        (_sig(keyid=KEYID_A + "\n"), "keyid must be 16 lowercase hex"),
        (_sig(keyid=KEYID_A[:15]), "keyid must be 16 lowercase hex"),
        (_sig(sig=5), "sig must be a base64 string"),
        (_sig(sig="%%%%"), "sig is not valid standard base64"),
        (_sig(extra=True), r"signatures\[0\] has unknown field"),
        (_sig(keyid=KEYID_B), "appears more than once"),
    ],
)
def test_envelope_from_json_rejects(obj: object, problem: str) -> None:
    with pytest.raises(EnvelopeFormatError, match=problem):
        Envelope.from_json(obj)


def test_envelope_from_json_round_trips() -> None:
    obj = _valid_json()
    assert Envelope.from_json(obj).to_json() == obj


# --- canonical JSON and the strict parser --------------------------------------------------


def test_canonical_json_rfc8785_ordering() -> None:
    # Keys sorted by UTF-16 code units (RFC 8785 section 3.2.3), so U+1F600 (D83D DE00)
    # sorts before U+FB33 although its code point is larger; no whitespace; UTF-8 output.
    value = {"\ufb33": 0, "b": 1, "a": [True, None, "é"], "\u20ac": 0, "\U0001f600": 0}
    assert canonical_json(value) == (
        '{"a":[true,null,"é"],"b":1,"\u20ac":0,"\U0001f600":0,"\ufb33":0}'.encode()
    )


@pytest.mark.parametrize(
    "value",
    [{"a": 1.0}, {"a": float("nan")}, {1: "x"}, {"a": 2**53}, {"a": object()}, {"a": "\ud800"}],
)
def test_canonical_json_refuses(value: object) -> None:
    with pytest.raises(PayloadError, match="cannot canonicalize"):
        canonical_json(value)


def test_parse_payload_accepts_valid() -> None:
    assert parse_payload(PAYLOAD) == TRANSFER
    assert parse_payload(b' { "a" : [ 1 , -2 , "x" ] } ') == {"a": [1, -2, "x"]}
    assert parse_payload(b'{"a":-9223372036854775808,"b":9223372036854775807}') == {
        "a": -(2**63),
        "b": 2**63 - 1,
    }
    nested = b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert parse_payload(nested)["a"] == [[[[[[[]]]]]]]
    # Brackets inside strings are not nesting.
    assert parse_payload(b'{"a":"[[[[[[[[[[{{{{{{{{{\\""}') == {"a": '[[[[[[[[[[{{{{{{{{{"'}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'{"amount":1,"amount":2}', "duplicate key 'amount'"),
        (b'{"a":{"b":1,"b":1}}', "duplicate key 'b'"),
        (b'{"a":[{"x":1,"x":2}]}', "duplicate key 'x'"),
        (b'{"amount":1.5}', r"floats .* not allowed \(number 1.5\)"),
        (b'{"amount":1.0}', "floats"),
        (b'{"amount":1e3}', "floats"),
        (b'{"amount":1E+3}', "floats"),
        (b'{"amount":-0.0}', "floats"),
        (b'{"amount":NaN}', "NaN is not allowed"),
        (b'{"amount":Infinity}', "Infinity is not allowed"),
        (b'{"amount":-Infinity}', "-Infinity is not allowed"),
        (b'{"a":9223372036854775808}', "64-bit range"),
        (b'{"a":-9223372036854775809}', "64-bit range"),
        (b'{"a":' + b"9" * 5000 + b"}", "64-bit range"),
        (b'{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "deeper than 8"),
        (b"[" * 100_000 + b"]" * 100_000, "deeper than 8"),
        (b'{"a":' * 100_000, "deeper than 8"),
        (b"[]", "must be a JSON object, got an array"),
        (b'"x"', "must be a JSON object, got a string"),
        (b"1", "must be a JSON object, got a number"),
        (b"null", "must be a JSON object, got null"),
        (b"true", "must be a JSON object, got a boolean"),
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"a":1} {}', "not valid JSON"),
        (b"{'a':1}", "not valid JSON"),
        (b'{"a":"\x01"}', "not valid JSON"),
        (b'{"a":1,}', "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # BOM
        (b'{"a":"\xff"}', "not valid UTF-8"),
        (b'{"a":"\xed\xa0\x80"}', "not valid UTF-8"),  # CESU surrogate bytes
        (b'{"a":"\\ud800"}', "unpaired surrogate"),
        (b'{"\\udc00":1}', "unpaired surrogate"),
        (b'{"a":"x\\u0000y"}', "NUL character"),
        (b'{"\\u0000":1}', "NUL character"),
    ],
)
def test_parse_payload_rejects(data: bytes, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        parse_payload(data)


def test_parse_payload_keeps_surrogate_pairs() -> None:
    assert parse_payload(b'{"a":"\\ud83d\\ude00"}') == {"a": "\U0001f600"}


def test_is_canonical() -> None:
    assert is_canonical(PAYLOAD)
    assert is_canonical(b"{}")
    assert not is_canonical(b'{"b":1,"a":2}')
    assert not is_canonical(b'{"a": 1}')
    assert not is_canonical(b'{"a":"\\u0041"}')  # escape where a literal is canonical
    assert not is_canonical(b'{"a":1.5}')
    assert not is_canonical(b'{"a":9007199254740992}')  # beyond JCS's exact integer range
    assert not is_canonical(b"\xff")
    assert not is_canonical(b"[]")


# --- fuzzing: only the documented errors, ever ---------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_b64_strings = st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())
_keyids = st.sampled_from([KEYID_A, KEYID_B]) | st.text(alphabet="0123456789abcdefABC", max_size=17)
_signature_objects = st.fixed_dictionaries(
    {"keyid": _keyids, "sig": _b64_strings | _json_values},
    optional={"extra": _json_values},
)
_envelope_like = st.fixed_dictionaries(
    {
        "payloadType": st.sampled_from([payload_type_for("transfer"), ""]) | _json_values,
        "payload": _b64_strings | _json_values,
        "signatures": st.lists(_signature_objects | _json_values, max_size=10) | _json_values,
    },
    optional={"extra": _json_values},
)

# Well-formed envelopes (random type, payload, key ids and signature bytes), so the fuzzer
# also exercises the accepting path and verification of arbitrary signatures.
_wellformed_envelope = st.fixed_dictionaries(
    {
        "payloadType": st.text(min_size=1, max_size=40),
        "payload": _b64_strings,
        # A dict keyed by key id gives distinct key ids, as from_json requires.
        "signatures": st.dictionaries(
            st.sampled_from([KEYID_A, KEYID_B])
            | st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
            _b64_strings,
            min_size=1,
            max_size=8,
        ).map(lambda sigs: [{"keyid": k, "sig": v} for k, v in sigs.items()]),
    }
)


@settings(max_examples=400)
@given(st.one_of(_json_values, _envelope_like, _wellformed_envelope))
def test_fuzz_envelope_from_json(obj: object) -> None:
    try:
        env = Envelope.from_json(obj)
    except EnvelopeFormatError:
        return
    # Whatever was accepted round-trips and can be checked without raising.
    assert env.to_json() == obj
    verified_keyids(env, _keys(KEY_A, KEY_B))


def _nested_json_bytes() -> st.SearchStrategy[bytes]:
    def dump(v: Any) -> bytes:
        return json.dumps(v, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")

    return _json_values.map(dump)


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=200), _nested_json_bytes()))
def test_fuzz_parse_payload(data: bytes) -> None:
    try:
        value = parse_payload(data)
    except PayloadError:
        return
    assert isinstance(value, dict)
    # Accepted payloads are plain JSON data; is_canonical must not raise on them either.
    is_canonical(data)
