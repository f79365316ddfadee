"""C2SP signed notes (c2sp.org/signed-note) with Ed25519 keys (signature type 0x01).

A signed note is a text ending in a newline, a blank line, then signature lines::

    — <key name> base64(key hash (4 bytes) || Ed25519 signature (64 bytes))

The ledger signs its checkpoints (c2sp.org/tlog-checkpoint) this way, with the ledger
origin as key name. A verifier is configured from a *vkey*,
``<name>+<8 hex key hash>+base64(0x01 || public key)``, and per the spec ignores signatures
from other keys, verifies every signature from its own key, and rejects the note when one
of those fails or none is present.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "ED25519_KEY_TYPE",
    "MAX_SIGNATURE_LINES",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "check_name",
    "check_note_chars",
    "is_valid_name",
    "key_hash",
    "parse_signature_line",
    "strict_b64decode",
    "vkey",
]

ED25519_KEY_TYPE = 0x01
# The spec requires accepting at least 16 signatures; a bound keeps a hostile note from
# costing unbounded work. (Go's golang.org/x/mod/sumdb/note uses 100 as well.)
MAX_SIGNATURE_LINES = 100

_SIG_PREFIX = "\u2014 "  # em dash, space
_KEY_HASH_SIZE = 4
_ED25519_PUBLIC_KEY_SIZE = 32


class NoteError(ValueError):
    """A note or verifier key is malformed, or the note is not validly signed."""


def key_hash(name: str, public_key: bytes) -> bytes:
    """Return the 4-byte key hash: SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    check_name(name)
    _check_public_key(public_key)
    data = name.encode("utf-8") + b"\n" + bytes([ED25519_KEY_TYPE]) + public_key
    return hashlib.sha256(data).digest()[:_KEY_HASH_SIZE]


def vkey(name: str, public_key: bytes) -> str:
    """Return the verifier key string ``<name>+<hash hex>+<base64(0x01 || pk)>``."""
    h = key_hash(name, public_key)
    encoded = base64.b64encode(bytes([ED25519_KEY_TYPE]) + public_key).decode("ascii")
    return f"{name}+{h.hex()}+{encoded}"


class NoteSigner:
    """Signs note texts with an Ed25519 key under a key name."""

    def __init__(self, name: str, signing_key: SigningKey) -> None:
        public_key = bytes(signing_key.verify_key)
        self._name = name
        self._key = signing_key
        self._public_key = public_key
        self._key_hash = key_hash(name, public_key)  # also validates the name

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_hash(self) -> bytes:
        return self._key_hash

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def vkey(self) -> str:
        """The verifier key that checks this signer's notes."""
        return vkey(self._name, self._public_key)

    def verifier(self) -> NoteVerifier:
        """Return the :class:`NoteVerifier` for this signer's key."""
        return NoteVerifier(self._name, self._public_key)

    def sign(self, text: str) -> str:
        """Return ``text`` signed: text, a blank line, and this key's signature line.

        ``text`` must be non-empty, end with a newline and contain no ASCII control
        characters other than newline (the spec forbids them in notes). Raises
        :class:`NoteError` otherwise.
        """
        if not text.endswith("\n"):
            raise NoteError("note text must end with a newline")
        check_note_chars(text)
        sig = self._key.sign(text.encode("utf-8")).signature
        encoded = base64.b64encode(self._key_hash + sig).decode("ascii")
        return f"{text}\n{_SIG_PREFIX}{self._name} {encoded}\n"


class NoteVerifier:
    """Verifies notes signed by one Ed25519 key under one key name."""

    def __init__(self, name: str, public_key: bytes) -> None:
        self._key_hash = key_hash(name, public_key)  # also validates name and key
        self._name = name
        self._public_key = public_key
        self._verify_key = VerifyKey(public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<8 hex key hash>+<base64(0x01 || 32-byte public key)>``.

        The key hash must match the one computed from name and key. Raises
        :class:`NoteError` with a message naming the problem.
        """
        # The name cannot contain '+', but base64 can: split at most twice.
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise NoteError("malformed vkey: expected <name>+<hash>+<key>")
        name, hash_hex, key_b64 = parts
        if not is_valid_name(name):
            raise NoteError(f"malformed vkey: invalid key name {name!r}")
        if len(hash_hex) != 2 * _KEY_HASH_SIZE or not all(
            c in "0123456789abcdefABCDEF" for c in hash_hex
        ):
            raise NoteError("malformed vkey: key hash must be 8 hex characters")
        raw = strict_b64decode(key_b64)
        if raw is None or len(raw) == 0:
            raise NoteError("malformed vkey: key is not valid base64")
        if raw[0] != ED25519_KEY_TYPE:
            raise NoteError(f"unsupported vkey type 0x{raw[0]:02x} (only Ed25519, 0x01)")
        if len(raw) != 1 + _ED25519_PUBLIC_KEY_SIZE:
            raise NoteError("malformed vkey: Ed25519 public key must be 32 bytes")
        verifier = cls(name, raw[1:])
        if verifier.key_hash != bytes.fromhex(hash_hex):
            raise NoteError("malformed vkey: key hash does not match name and key")
        return verifier

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_hash(self) -> bytes:
        return self._key_hash

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def vkey(self) -> str:
        return vkey(self._name, self._public_key)

    def verify(self, note: str) -> str:
        """Verify a signed note and return its text (including the final newline).

        Signature lines of other keys (a different name or key hash) are ignored. Every
        line of this key must verify, and at least one must be present; otherwise, or if
        the note is malformed, :class:`NoteError` is raised.
        """
        check_note_chars(note)
        # The text is separated from the signatures by the *last* blank line; the text
        # itself may contain blank lines.
        split = note.rfind("\n\n")
        if split < 0:
            raise NoteError("malformed note: no blank line before the signatures")
        text, sig_block = note[: split + 1], note[split + 2 :]
        if not sig_block or not sig_block.endswith("\n"):
            raise NoteError("malformed note: signature block must end with a newline")
        lines = sig_block[:-1].split("\n")
        if len(lines) > MAX_SIGNATURE_LINES:
            raise NoteError(f"malformed note: more than {MAX_SIGNATURE_LINES} signatures")

        message = text.encode("utf-8")
        found = False
        for number, line in enumerate(lines, start=1):
            name, h, sig = parse_signature_line(line, number)
            if name != self._name or h != self._key_hash:
                continue
            found = True
            try:
                self._verify_key.verify(message, sig)
            except (BadSignatureError, ValueError):
                # A known key's signature that fails means the note was tampered with or
                # mis-signed: reject it whole, as the spec recommends.
                raise NoteError(
                    f"signature by {self._name}+{self._key_hash.hex()} does not verify"
                ) from None
        if not found:
            raise NoteError(f"note has no signature by {self._name}+{self._key_hash.hex()}")
        return text


# --- helpers -------------------------------------------------------------------------------


# The signed-note grammar's checks, public for the other note formats of ubc (the witness's
# cosignatures, ubc.witness) that share it.


def is_valid_name(name: str) -> bool:
    """Whether ``name`` may name a key."""
    # Spec: non-empty, no Unicode spaces, no '+'. Control characters are excluded because
    # they may not appear in a note at all.
    return (
        bool(name)
        and "+" not in name
        and not any(c.isspace() or ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in name)
    )


def check_name(name: str) -> None:
    """NoteError unless ``name`` may name a key."""
    if not is_valid_name(name):
        raise NoteError(f"invalid key name {name!r}: must be non-empty, no spaces or '+'")


def _check_public_key(public_key: bytes) -> None:
    if not isinstance(public_key, bytes) or len(public_key) != _ED25519_PUBLIC_KEY_SIZE:
        raise NoteError("Ed25519 public key must be 32 bytes")


def check_note_chars(s: str) -> None:
    """Notes must be valid UTF-8 with no ASCII control characters other than newline."""
    for c in s:
        o = ord(c)
        if (o < 0x20 and c != "\n") or 0xD800 <= o <= 0xDFFF:
            raise NoteError(f"malformed note: forbidden character U+{o:04X}")


def parse_signature_line(line: str, number: int) -> tuple[str, bytes, bytes]:
    """Split ``— <name> <base64>`` into name, 4-byte key hash and signature bytes."""
    if not line.startswith(_SIG_PREFIX):
        raise NoteError(f"malformed note: signature line {number} does not start with '— '")
    name, sep, encoded = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep or not is_valid_name(name):
        raise NoteError(f"malformed note: signature line {number} has no valid key name")
    raw = strict_b64decode(encoded)
    # At least the 4-byte hash and one byte of signature, as in the reference code.
    if raw is None or len(raw) <= _KEY_HASH_SIZE:
        raise NoteError(f"malformed note: signature line {number} has an invalid signature")
    return name, raw[:_KEY_HASH_SIZE], raw[_KEY_HASH_SIZE:]


def strict_b64decode(s: str) -> bytes | None:
    """Standard padded base64 (no other characters), or None."""
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        return None
