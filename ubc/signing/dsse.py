"""DSSE v1 envelopes (secure-systems-lab/dsse) signed with Ed25519.

Wire form (DESIGN.md section 4)::

    {"payloadType": "application/vnd.ubc.transfer+json",
     "payload": "<standard base64 of the exact payload bytes>",
     "signatures": [{"keyid": "<16 lowercase hex>", "sig": "<standard base64>"}]}

Signatures cover ``PAE(payloadType, payload)``, never the JSON envelope, so the envelope's
own serialization does not matter; only the decoded payload bytes and the type string do.
:meth:`Envelope.from_json` is the gate for untrusted input and raises only
:class:`EnvelopeFormatError`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from ubc.signing.keys import key_id

__all__ = [
    "MAX_SIGNATURES",
    "PAYLOAD_TYPE_PREFIX",
    "Envelope",
    "EnvelopeFormatError",
    "Signature",
    "add_signature",
    "pae",
    "payload_type_for",
    "sign_envelope",
    "type_name",
    "verified_keyids",
]

PAYLOAD_TYPE_PREFIX = "application/vnd.ubc."
_PAYLOAD_TYPE_SUFFIX = "+json"
# At most two signatures are ever needed (withdrawal, key.rotate, ledger.config); a small
# cap bounds the verification work an anonymous request can cause.
MAX_SIGNATURES = 8

# Type names are dotted lowercase words: "transfer", "member.register", "ledger.genesis".
_TYPE_NAME = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
_KEYID = re.compile(r"[0-9a-f]{16}")
_ENVELOPE_KEYS = frozenset({"payloadType", "payload", "signatures"})
_SIGNATURE_KEYS = frozenset({"keyid", "sig"})


class EnvelopeFormatError(ValueError):
    """An envelope does not have the required shape; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature of an envelope: the signer's key id and the raw Ed25519 signature."""

    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """A DSSE envelope: payload type, exact payload bytes and one or more signatures."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        """Return the wire form: payload and signatures as standard padded base64."""
        return {
            "payloadType": self.payload_type,
            "payload": _b64(self.payload),
            "signatures": [{"keyid": s.keyid, "sig": _b64(s.sig)} for s in self.signatures],
        }

    @classmethod
    def from_json(cls, obj: object) -> Envelope:
        """Validate an untrusted, already JSON-decoded envelope and build an Envelope.

        Requires an object with exactly the keys ``payloadType``, ``payload`` and
        ``signatures``; a non-empty type string; canonical strict standard base64 for the
        payload and each signature; 1 to :data:`MAX_SIGNATURES` signatures, each an object
        with exactly ``keyid`` (16 lowercase hex) and ``sig``, with no key id repeated.
        Raises :class:`EnvelopeFormatError` and nothing else.
        """
        if not isinstance(obj, dict):
            raise EnvelopeFormatError("envelope must be a JSON object")
        _check_keys(obj, _ENVELOPE_KEYS, "envelope")
        payload_type = obj["payloadType"]
        if not isinstance(payload_type, str) or not payload_type:
            raise EnvelopeFormatError("envelope payloadType must be a non-empty string")
        if not _is_utf8_encodable(payload_type):
            raise EnvelopeFormatError("envelope payloadType is not valid Unicode")
        payload = _b64decode_field(obj["payload"], "envelope payload")
        raw_sigs = obj["signatures"]
        if not isinstance(raw_sigs, list):
            raise EnvelopeFormatError("envelope signatures must be an array")
        if not 1 <= len(raw_sigs) <= MAX_SIGNATURES:
            raise EnvelopeFormatError(
                f"envelope must have 1 to {MAX_SIGNATURES} signatures, got {len(raw_sigs)}"
            )
        signatures: list[Signature] = []
        seen: set[str] = set()
        for i, raw in enumerate(raw_sigs):
            where = f"envelope signatures[{i}]"
            if not isinstance(raw, dict):
                raise EnvelopeFormatError(f"{where} must be an object")
            _check_keys(raw, _SIGNATURE_KEYS, where)
            keyid = raw["keyid"]
            if not isinstance(keyid, str) or not _KEYID.fullmatch(keyid):
                raise EnvelopeFormatError(f"{where}.keyid must be 16 lowercase hex characters")
            # One signature per key: a repeated key id adds no consent, only ambiguity.
            if keyid in seen:
                raise EnvelopeFormatError(f"{where}.keyid {keyid} appears more than once")
            seen.add(keyid)
            signatures.append(Signature(keyid, _b64decode_field(raw["sig"], f"{where}.sig")))
        return cls(payload_type, payload, tuple(signatures))


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the exact bytes that are signed.

    ``b"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with LEN the ASCII decimal
    byte length, so neither part can be shifted into the other.
    """
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def payload_type_for(name: str) -> str:
    """Return the payload type of a type name: ``application/vnd.ubc.<name>+json``."""
    if not _TYPE_NAME.fullmatch(name):
        raise ValueError(f"invalid payload type name {name!r}")
    return f"{PAYLOAD_TYPE_PREFIX}{name}{_PAYLOAD_TYPE_SUFFIX}"


def type_name(payload_type: str) -> str | None:
    """Inverse of :func:`payload_type_for`; None if ``payload_type`` is not a ubc type."""
    if not payload_type.startswith(PAYLOAD_TYPE_PREFIX) or not payload_type.endswith(
        _PAYLOAD_TYPE_SUFFIX
    ):
        return None
    name = payload_type[len(PAYLOAD_TYPE_PREFIX) : -len(_PAYLOAD_TYPE_SUFFIX)]
    return name if _TYPE_NAME.fullmatch(name) else None


def sign_envelope(payload_type: str, payload: bytes, keys: Sequence[SigningKey]) -> Envelope:
    """Sign ``payload`` with each key in order and return the envelope.

    Needs 1 to :data:`MAX_SIGNATURES` distinct keys; raises ``ValueError`` otherwise.
    """
    if not 1 <= len(keys) <= MAX_SIGNATURES:
        raise ValueError(f"need 1 to {MAX_SIGNATURES} signing keys, got {len(keys)}")
    env = Envelope(payload_type, payload, ())
    for key in keys:
        env = add_signature(env, key)
    return env


def add_signature(env: Envelope, key: SigningKey) -> Envelope:
    """Return a copy of ``env`` with one more signature, by ``key``.

    Used for co-signing (e.g. a withdrawal signed by the owner, then the operator). Raises
    ``ValueError`` if ``key`` already signed or the envelope is full.
    """
    kid = key_id(bytes(key.verify_key))
    if any(s.keyid == kid for s in env.signatures):
        raise ValueError(f"key {kid} already signed this envelope")
    if len(env.signatures) >= MAX_SIGNATURES:
        raise ValueError(f"envelope already has {MAX_SIGNATURES} signatures")
    sig = key.sign(pae(env.payload_type, env.payload)).signature
    return Envelope(env.payload_type, env.payload, (*env.signatures, Signature(kid, sig)))


def verified_keyids(env: Envelope, public_keys: Mapping[str, bytes]) -> frozenset[str]:
    """Return the key ids whose signature in ``env`` verifies under ``public_keys``.

    ``public_keys`` maps key id to 32-byte public key. A key id counts only if it is in the
    envelope and in the mapping, the mapping's key really has that id (a mis-built mapping
    must not let one key vouch for another), and its signature verifies over the PAE with
    libsodium's strict Ed25519. Unknown key ids and bad signatures are simply left out; the
    caller decides what set of signers it needs.
    """
    message = pae(env.payload_type, env.payload)
    verified: set[str] = set()
    for s in env.signatures:
        pk = public_keys.get(s.keyid)
        if pk is None:
            continue
        try:
            keyid, verifier = _verifier(pk)
            if keyid != s.keyid:
                continue
            verifier.verify(message, s.sig)
        except (BadSignatureError, ValueError, TypeError):
            # Wrong-length keys or signatures raise ValueError/TypeError: not a valid
            # signature either way.
            continue
        verified.add(s.keyid)
    return frozenset(verified)


# --- helpers -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _verifier(public_key: bytes) -> tuple[str, VerifyKey]:
    """A public key's id and its verifier, made once per key (ValueError or TypeError for
    bytes that are not a key, as ``VerifyKey`` raises them; not cached)."""
    return key_id(public_key), VerifyKey(public_key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode_field(value: object, where: str) -> bytes:
    """Strict standard base64: alphabet only, correct padding, and canonical.

    Canonical (re-encoding gives the same string) means one byte string has one spelling,
    so ``Envelope.from_json(x).to_json() == x`` for every accepted ``x``.
    """
    if not isinstance(value, str):
        raise EnvelopeFormatError(f"{where} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeFormatError(f"{where} is not valid standard base64") from None
    if _b64(data) != value:
        raise EnvelopeFormatError(f"{where} is not canonical standard base64")
    return data


def _check_keys(obj: dict[Any, Any], expected: frozenset[str], where: str) -> None:
    keys = set(obj)
    missing = expected - keys
    if missing:
        raise EnvelopeFormatError(f"{where} is missing {', '.join(sorted(missing))}")
    extra = keys - expected
    if extra:
        names = ", ".join(sorted(repr(k) for k in extra))
        raise EnvelopeFormatError(f"{where} has unknown field(s) {names}")


def _is_utf8_encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
