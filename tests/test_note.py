"""Tests for ubc.signing.note: C2SP signed notes with Ed25519 keys.

The spec example (c2sp.org/signed-note, also quoted in DESIGN.md section 5) is the anchor:
if it verifies, our key hash, vkey parsing, text/signature split and Ed25519 use agree with
the reference implementation.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from ubc.signing import NoteError, NoteSigner, NoteVerifier, key_hash, public_key_bytes, vkey

SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_TEXT = "This is an example message.\n"
SPEC_SIG_LINE = (
    "\u2014 example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)
SPEC_NOTE = SPEC_TEXT + "\n" + SPEC_SIG_LINE

ORIGIN = "ubc.example.org/ledger"
KEY = SigningKey(bytes(range(1, 33)))
OTHER = SigningKey(bytes(range(33, 65)))


def test_spec_example_verifies() -> None:
    verifier = NoteVerifier.from_vkey(SPEC_VKEY)
    assert verifier.name == "example.com/foo"
    assert verifier.key_hash == bytes.fromhex("530d903a")
    assert verifier.vkey == SPEC_VKEY
    assert vkey(verifier.name, verifier.public_key) == SPEC_VKEY
    assert key_hash(verifier.name, verifier.public_key).hex() == "530d903a"
    assert verifier.verify(SPEC_NOTE) == SPEC_TEXT


def test_spec_example_tampered_text_fails() -> None:
    verifier = NoteVerifier.from_vkey(SPEC_VKEY)
    with pytest.raises(NoteError, match="does not verify"):
        verifier.verify("This is an example message!\n\n" + SPEC_SIG_LINE)


def test_signer_vector() -> None:
    # Made once with NoteSigner(ORIGIN, SigningKey(bytes(range(1, 33)))).sign("hello\n");
    # Ed25519 is deterministic, so the line is fixed.
    signer = NoteSigner(ORIGIN, KEY)
    assert (
        signer.vkey
        == "ubc.example.org/ledger+0c6e4a34+AXm1Vi6P5lT5QHixEuipi6eQH4U65pW+1+DjkQutBJZk"
    )
    assert signer.sign("hello\n") == (
        "hello\n\n\u2014 ubc.example.org/ledger "
        "DG5KNNCIlYkEgNTj7Ny0T7J3GEkMNXnuDj4+4cC7+WVdW9bfBwoqgW6WDCCG5xI1b2NqHLgrrGX61Sv5AwDBXo6/sgs=\n"
    )


def test_round_trip_with_blank_lines_in_text() -> None:
    signer = NoteSigner(ORIGIN, KEY)
    text = f"{ORIGIN}\n42\nqUuU0Fqq0X4aRkNLaXlb0w8xgDgKkWUUA6x4nsQ1OBM=\n\nextension line\n\n"
    verifier = NoteVerifier.from_vkey(signer.vkey)
    assert verifier.verify(signer.sign(text)) == text
    assert signer.verifier().verify(signer.sign("\n")) == "\n"


def test_other_keys_are_ignored() -> None:
    signer = NoteSigner(ORIGIN, KEY)
    note = signer.sign("checkpoint\n")
    other = NoteSigner("witness.example/w1", OTHER).sign("checkpoint\n").split("\n\n")[1]
    same_name_other_key = NoteSigner(ORIGIN, OTHER).sign("checkpoint\n").split("\n\n")[1]
    # A garbage signature from an unknown key must be ignored, not verified.
    unknown = "\u2014 witness.example/w2 " + base64.b64encode(b"\x00" * 68).decode() + "\n"
    cosigned = "checkpoint\n\n" + other + note.split("\n\n")[1] + same_name_other_key + unknown
    assert signer.verifier().verify(cosigned) == "checkpoint\n"


def test_note_without_our_signature_fails() -> None:
    note = NoteSigner("witness.example/w1", OTHER).sign("checkpoint\n")
    with pytest.raises(NoteError, match="no signature by ubc.example.org/ledger"):
        NoteSigner(ORIGIN, KEY).verifier().verify(note)
    # Same name but another key: its hash differs, so still "no signature".
    note = NoteSigner(ORIGIN, OTHER).sign("checkpoint\n")
    with pytest.raises(NoteError, match="no signature"):
        NoteSigner(ORIGIN, KEY).verifier().verify(note)


def test_bad_signature_from_our_key_rejects_note() -> None:
    signer = NoteSigner(ORIGIN, KEY)
    good = signer.sign("checkpoint\n")
    raw = base64.b64decode(good.split(" ")[-1])
    bad_raw = raw[:4] + bytes([raw[4] ^ 1]) + raw[5:]
    bad_line = f"\u2014 {ORIGIN} {base64.b64encode(bad_raw).decode()}\n"
    with pytest.raises(NoteError, match="does not verify"):
        signer.verifier().verify("checkpoint\n\n" + bad_line)
    # Even next to a good signature by the same key: the note was tampered with.
    with pytest.raises(NoteError, match="does not verify"):
        signer.verifier().verify(good + bad_line)
    short_line = f"\u2014 {ORIGIN} {base64.b64encode(raw[:40]).decode()}\n"
    with pytest.raises(NoteError, match="does not verify"):
        signer.verifier().verify("checkpoint\n\n" + short_line)


@pytest.mark.parametrize(
    ("note", "problem"),
    [
        ("", "no blank line"),
        (SPEC_TEXT, "no blank line"),
        (SPEC_TEXT + "\n", "signature block"),
        (SPEC_NOTE.rstrip("\n"), "signature block"),
        (SPEC_TEXT + "\n" + SPEC_SIG_LINE.replace("\u2014", "-"), "does not start"),
        (SPEC_TEXT + "\n" + SPEC_SIG_LINE.replace(" ", "", 1), "does not start"),
        (SPEC_TEXT + "\n" + "\u2014 example.com/foo\n", "no valid key name"),
        (SPEC_TEXT + "\n" + "\u2014 example.com/foo !!!\n", "invalid signature"),
        (SPEC_TEXT + "\n" + "\u2014 example.com/foo AAAA\n", "invalid signature"),
        (SPEC_TEXT + "\n" + "\u2014 example.com/foo \n", "invalid signature"),
        (SPEC_TEXT + "\n" + SPEC_SIG_LINE + "\n", "signature block"),
        ("tab\there\n\n" + SPEC_SIG_LINE, "forbidden character U\\+0009"),
        ("cr\r\n\n" + SPEC_SIG_LINE, "forbidden character U\\+000D"),
        ("\ud800\n\n" + SPEC_SIG_LINE, "forbidden character"),
        (SPEC_TEXT + "\n" + SPEC_SIG_LINE * 101, "more than 100 signatures"),
    ],
)
def test_malformed_notes(note: str, problem: str) -> None:
    with pytest.raises(NoteError, match=problem):
        NoteVerifier.from_vkey(SPEC_VKEY).verify(note)


def test_sixteen_signatures_accepted() -> None:
    # The spec says verifiers must accept at least 16 signatures.
    signer = NoteSigner(ORIGIN, KEY)
    others = [NoteSigner(f"w{i}.example", SigningKey(bytes([i]) * 32)) for i in range(15)]
    lines = "".join(o.sign("t\n").split("\n\n")[1] for o in others)
    assert signer.verifier().verify(signer.sign("t\n") + lines) == "t\n"


@pytest.mark.parametrize(
    ("bad_vkey", "problem"),
    [
        ("", "expected <name>"),
        ("example.com/foo+530d903a", "expected <name>"),
        ("+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "invalid key name"),
        ("exa mple+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "invalid key name"),
        ("example.com/foo+530d903+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "8 hex"),
        ("example.com/foo+530d903g+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "8 hex"),
        ("example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "does not match"),
        ("example.com/bar+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "does not match"),
        ("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2", "base64"),
        ("example.com/foo+530d903a+", "base64"),
        (
            # Same key under signature type 0x02.
            "example.com/foo+530d903a+AukyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
            "unsupported vkey type 0x02",
        ),
        ("example.com/foo+530d903a+AQID", "32 bytes"),
    ],
)
def test_bad_vkeys(bad_vkey: str, problem: str) -> None:
    with pytest.raises(NoteError, match=problem):
        NoteVerifier.from_vkey(bad_vkey)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\nb"])
def test_invalid_key_names(name: str) -> None:
    with pytest.raises(NoteError, match="invalid key name"):
        NoteSigner(name, KEY)
    with pytest.raises(NoteError, match="invalid key name"):
        NoteVerifier(name, public_key_bytes(KEY))


@pytest.mark.parametrize("text", ["", "no newline", "tab\t\n", "\x00\n", "\ud800\n"])
def test_sign_rejects_bad_text(text: str) -> None:
    with pytest.raises(NoteError):
        NoteSigner(ORIGIN, KEY).sign(text)


_note_text = st.text(
    alphabet=st.characters(codec="utf-8", min_codepoint=0x20) | st.just("\n"),
    max_size=60,
).map(lambda s: s + "\n")


@settings(max_examples=200)
@given(_note_text)
def test_fuzz_round_trip(text: str) -> None:
    signer = NoteSigner(ORIGIN, KEY)
    assert signer.verifier().verify(signer.sign(text)) == text


@settings(max_examples=300)
@given(st.text(max_size=200) | _note_text.map(lambda t: t + "\n" + SPEC_SIG_LINE))
def test_fuzz_verify_only_raises_note_error(note: str) -> None:
    try:
        NoteVerifier.from_vkey(SPEC_VKEY).verify(note)
    except NoteError:
        pass
