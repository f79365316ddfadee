"""C2SP ``tlog-cosignature`` v1 with Ed25519 (c2sp.org/tlog-cosignature).

A cosignature is a signed-note signature line on a checkpoint::

    — <cosigner name> base64(key ID (4 bytes) || timestamp (8 bytes, big-endian) || sig (64))

- key ID = SHA-256(name || "\\n" || 0x04 || 32-byte Ed25519 public key)[:4];
- the signed message is ``cosignature/v1\\ntime <timestamp>\\n`` followed by the whole
  checkpoint body (with its final newline, without any signature line);
- the cosigner's vkey is ``<name>+<key ID hex>+base64(0x04 || public key)``, the
  signed-note verifier-key format with signature type 0x04.

The Ed25519 message does not commit to the cosigner name: one key must serve one
cosigner only.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from ubc.signing.note import (
    MAX_SIGNATURE_LINES,
    NoteError,
    check_name,
    check_note_chars,
    is_valid_name,
    parse_signature_line,
    strict_b64decode,
)

__all__ = [
    "COSIGNATURE_KEY_TYPE",
    "COSIGNATURE_SIZE",
    "Cosignature",
    "CosignatureError",
    "CosignatureMissing",
    "Cosigner",
    "CosignatureVerifier",
    "cosignature_key_id",
    "cosignature_vkey",
    "cosigned_message",
    "split_note",
]

COSIGNATURE_KEY_TYPE = 0x04
HEADER = "cosignature/v1"
_KEY_ID_SIZE = 4
_TIMESTAMP_SIZE = 8
_ED25519_SIGNATURE_SIZE = 64
_ED25519_PUBLIC_KEY_SIZE = 32
COSIGNATURE_SIZE = _TIMESTAMP_SIZE + _ED25519_SIGNATURE_SIZE
"""Bytes after the key ID: the 8-byte timestamp and the 64-byte Ed25519 signature."""
_MAX_TIMESTAMP = 2**63 - 1
_SIG_PREFIX = "\u2014 "


class CosignatureError(NoteError):
    """A cosignature, a cosigner vkey or the note carrying it is malformed or invalid."""


class CosignatureMissing(CosignatureError):
    """The note carries no cosignature of this cosigner (no line of its name and key ID)."""


def cosignature_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x04 || public key)[:4]."""
    check_name(name)
    _check_public_key(public_key)
    data = name.encode("utf-8") + b"\n" + bytes([COSIGNATURE_KEY_TYPE]) + public_key
    return hashlib.sha256(data).digest()[:_KEY_ID_SIZE]


def cosignature_vkey(name: str, public_key: bytes) -> str:
    """``<name>+<key ID hex>+base64(0x04 || public key)``."""
    key_id = cosignature_key_id(name, public_key)
    encoded = base64.b64encode(bytes([COSIGNATURE_KEY_TYPE]) + public_key).decode("ascii")
    return f"{name}+{key_id.hex()}+{encoded}"


def cosigned_message(body: str, timestamp: int) -> bytes:
    """The bytes an Ed25519 cosignature/v1 signs for checkpoint ``body`` at ``timestamp``."""
    _check_timestamp(timestamp)
    if not body.endswith("\n"):
        raise CosignatureError("checkpoint body must end with a newline")
    return f"{HEADER}\ntime {timestamp}\n{body}".encode()


def split_note(note: str) -> tuple[str, list[str]]:
    """Split a signed note into its body (with the final newline) and signature lines.

    Checks only the structure (what signed-note requires of every note); raises
    :class:`NoteError` if the note is malformed.
    """
    check_note_chars(note)
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before the signatures")
    body, block = note[: split + 1], note[split + 2 :]
    if not block or not block.endswith("\n"):
        raise NoteError("malformed note: signature block must end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURE_LINES:
        raise NoteError(f"malformed note: more than {MAX_SIGNATURE_LINES} signatures")
    for number, line in enumerate(lines, start=1):
        parse_signature_line(line, number)
    return body, lines


@dataclass(frozen=True)
class Cosignature:
    """A verified cosignature: who, when (POSIX seconds), and its signature line."""

    name: str
    timestamp: int
    line: str


class _Identity:
    """A cosigner's name and Ed25519 public key, and what follows from them."""

    def __init__(self, name: str, public_key: bytes) -> None:
        self._key_id = cosignature_key_id(name, public_key)  # validates name and key
        self._name = name
        self._public_key = public_key

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def vkey(self) -> str:
        return cosignature_vkey(self._name, self._public_key)


class Cosigner(_Identity):
    """A witness's signing side: an Ed25519 key under a cosigner name."""

    def __init__(self, name: str, signing_key: SigningKey) -> None:
        super().__init__(name, bytes(signing_key.verify_key))
        self._key = signing_key

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self._name, self._public_key)

    def sign(self, body: str, timestamp: int) -> str:
        """The cosignature line (ending in a newline) on checkpoint ``body`` at ``timestamp``."""
        check_note_chars(body)
        signature = self._key.sign(cosigned_message(body, timestamp)).signature
        raw = self._key_id + timestamp.to_bytes(_TIMESTAMP_SIZE, "big") + signature
        return f"{_SIG_PREFIX}{self._name} {base64.b64encode(raw).decode('ascii')}\n"


class CosignatureVerifier(_Identity):
    """Checks the cosignatures of one cosigner (name and Ed25519 key) on checkpoints."""

    def __init__(self, name: str, public_key: bytes) -> None:
        super().__init__(name, public_key)
        self._verify_key = VerifyKey(public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> CosignatureVerifier:
        """Parse ``<name>+<8 hex key ID>+base64(0x04 || 32-byte key)``."""
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise CosignatureError("malformed cosigner vkey: expected <name>+<hash>+<key>")
        name, id_hex, key_b64 = parts
        if not is_valid_name(name):
            raise CosignatureError(f"malformed cosigner vkey: invalid name {name!r}")
        if len(id_hex) != 2 * _KEY_ID_SIZE or not all(
            c in "0123456789abcdefABCDEF" for c in id_hex
        ):
            raise CosignatureError("malformed cosigner vkey: key ID must be 8 hex characters")
        raw = strict_b64decode(key_b64)
        if raw is None or not raw:
            raise CosignatureError("malformed cosigner vkey: key is not valid base64")
        if raw[0] != COSIGNATURE_KEY_TYPE:
            raise CosignatureError(
                f"cosigner vkey has type 0x{raw[0]:02x}, want 0x04 (Ed25519 cosignature/v1)"
            )
        if len(raw) != 1 + _ED25519_PUBLIC_KEY_SIZE:
            raise CosignatureError("malformed cosigner vkey: Ed25519 key must be 32 bytes")
        verifier = cls(name, raw[1:])
        if verifier.key_id != bytes.fromhex(id_hex):
            raise CosignatureError("malformed cosigner vkey: key ID does not match name and key")
        return verifier

    def verify_line(self, body: str, line: str) -> Cosignature | None:
        """Check one signature line on checkpoint ``body``.

        None if the line is another key's (other name or key ID); the cosignature if it
        is this cosigner's and verifies; :class:`CosignatureError` if it is this
        cosigner's and does not.
        """
        name, key_id, rest = parse_signature_line(line.removesuffix("\n"), 1)
        if name != self._name or key_id != self._key_id:
            return None
        if len(rest) != COSIGNATURE_SIZE:
            raise CosignatureError(
                f"cosignature by {self._name} has {len(rest)} bytes after the key ID, "
                f"want {COSIGNATURE_SIZE}"
            )
        timestamp = int.from_bytes(rest[:_TIMESTAMP_SIZE], "big")
        if timestamp > _MAX_TIMESTAMP:
            raise CosignatureError(f"cosignature by {self._name} has a timestamp over 2**63-1")
        try:
            self._verify_key.verify(cosigned_message(body, timestamp), rest[_TIMESTAMP_SIZE:])
        except (BadSignatureError, ValueError):
            raise CosignatureError(
                f"cosignature by {self._name}+{self._key_id.hex()} does not verify"
            ) from None
        return Cosignature(self._name, timestamp, line.removesuffix("\n"))

    def verify(self, note: str) -> Cosignature:
        """Verify this cosigner's cosignature in a signed checkpoint note.

        Lines of other keys are ignored; every line of this cosigner must verify and at
        least one must be there (the latest timestamp is returned). Raises
        :class:`NoteError` (a :class:`CosignatureError` for a bad cosignature).
        """
        body, lines = split_note(note)
        found: Cosignature | None = None
        for line in lines:
            cosignature = self.verify_line(body, line)
            if cosignature is not None and (
                found is None or cosignature.timestamp > found.timestamp
            ):
                found = cosignature
        if found is None:
            raise CosignatureMissing(
                f"note has no cosignature by {self._name}+{self._key_id.hex()}"
            )
        return found


def _check_timestamp(timestamp: int) -> None:
    if (
        isinstance(timestamp, bool)
        or not isinstance(timestamp, int)
        or not 0 <= timestamp <= _MAX_TIMESTAMP
    ):
        raise CosignatureError(f"timestamp must be an integer in [0, 2**63), got {timestamp!r}")


def _check_public_key(public_key: bytes) -> None:
    if not isinstance(public_key, bytes) or len(public_key) != _ED25519_PUBLIC_KEY_SIZE:
        raise CosignatureError("Ed25519 public key must be 32 bytes")
