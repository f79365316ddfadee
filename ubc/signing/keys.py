"""Ed25519 keys, key ids and bearer tokens, and their on-disk form.

Contract (DESIGN.md section 4): a key file is one line, the standard base64 of the 32-byte
Ed25519 seed, mode 0600. Public keys travel as standard padded base64 of their 32 bytes, and
a key id is the lowercase hex of the first 8 bytes of SHA-256 of the public key.

Secret files are never overwritten: losing a ledger or operator key by an accidental second
``ubc init`` would be unrecoverable, so creation fails if the path exists.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path

from nacl.signing import SigningKey

__all__ = [
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "TOKEN_PREFIX",
    "decode_public_key",
    "encode_public_key",
    "generate_signing_key",
    "generate_token",
    "key_id",
    "load_signing_key",
    "public_key_bytes",
    "seed_b64",
    "signing_key_from_seed_b64",
    "write_signing_key",
    "write_token",
]

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
TOKEN_PREFIX = "ubc_tok_"

# 32 random bytes make a token that cannot be guessed; the prefix lets secret scanners and
# humans recognise a leaked token.
_TOKEN_BYTES = 32


def generate_signing_key() -> SigningKey:
    """Return a fresh Ed25519 signing key from the OS random source."""
    return SigningKey.generate()


def signing_key_from_seed_b64(s: str) -> SigningKey:
    """Build a signing key from the standard base64 of its 32-byte seed.

    Surrounding whitespace is ignored (key files end with a newline); anything else that is
    not strict base64 of exactly 32 bytes raises ``ValueError``.
    """
    seed = _strict_b64decode(s.strip(), what="signing key seed")
    if len(seed) != SEED_SIZE:
        raise ValueError(f"signing key seed must be {SEED_SIZE} bytes, got {len(seed)}")
    return SigningKey(seed)


def seed_b64(key: SigningKey) -> str:
    """Return the standard base64 of the key's 32-byte seed (the key file's content)."""
    return base64.b64encode(bytes(key)).decode("ascii")


def public_key_bytes(key: SigningKey) -> bytes:
    """Return the 32-byte Ed25519 public key of a signing key."""
    return bytes(key.verify_key)


def write_signing_key(path: str | os.PathLike[str], key: SigningKey) -> None:
    """Write ``key`` to a new file at ``path``: one line of base64 seed, mode 0600.

    Raises ``FileExistsError`` if anything already exists at ``path``: keys are never
    overwritten.
    """
    _write_secret_file(Path(path), seed_b64(key) + "\n")


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read a key file written by :func:`write_signing_key`.

    Raises ``ValueError`` naming the file when its content is not one base64 seed of
    32 bytes; ``OSError`` (e.g. ``FileNotFoundError``) propagates unchanged.
    """
    p = Path(path)
    raw = p.read_bytes()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{p}: key file is not ASCII base64") from None
    try:
        return signing_key_from_seed_b64(text)
    except ValueError as e:
        raise ValueError(f"{p}: malformed key file: {e}") from None


def key_id(public_key: bytes) -> str:
    """Return the key id: lowercase hex of the first 8 bytes of SHA-256(public key)."""
    _check_public_key(public_key)
    return hashlib.sha256(public_key).digest()[:8].hex()


def encode_public_key(pk: bytes) -> str:
    """Return the standard padded base64 of a 32-byte public key."""
    _check_public_key(pk)
    return base64.b64encode(pk).decode("ascii")


def decode_public_key(s: str) -> bytes:
    """Decode a public key from strict standard base64; it must be exactly 32 bytes.

    Raises ``ValueError`` with a message naming the problem.
    """
    pk = _strict_b64decode(s, what="public key")
    if len(pk) != PUBLIC_KEY_SIZE:
        raise ValueError(f"public key must be {PUBLIC_KEY_SIZE} bytes, got {len(pk)}")
    return pk


def generate_token() -> str:
    """Return a new bearer token: ``ubc_tok_`` + 32 random bytes, urlsafe base64, no padding."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(_TOKEN_BYTES)).rstrip(b"=")
    return TOKEN_PREFIX + body.decode("ascii")


def write_token(path: str | os.PathLike[str], token: str | None = None) -> str:
    """Write a bearer token (a new one unless ``token`` is given) to a new 0600 file.

    The file holds the token on one line. Returns the token. Raises ``FileExistsError`` if
    anything already exists at ``path``.
    """
    if token is None:
        token = generate_token()
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("token must be non-empty printable ASCII without spaces")
    _write_secret_file(Path(path), token + "\n")
    return token


# --- helpers -------------------------------------------------------------------------------


def _check_public_key(pk: bytes) -> None:
    if not isinstance(pk, bytes) or len(pk) != PUBLIC_KEY_SIZE:
        raise ValueError(f"public key must be {PUBLIC_KEY_SIZE} bytes")


def _strict_b64decode(s: str, *, what: str) -> bytes:
    """Decode standard base64, refusing characters outside the alphabet and bad padding.

    Also refuses non-canonical encodings (non-zero trailing bits), so one value has exactly
    one accepted spelling.
    """
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid standard base64") from None
    if base64.b64encode(data).decode("ascii") != s:
        raise ValueError(f"{what} is not canonical standard base64")
    return data


def _write_secret_file(path: Path, content: str) -> None:
    # O_EXCL makes "does it exist?" and "create it" one atomic step (and refuses to follow a
    # symlink planted at the path); the mode is given at creation so the secret is never
    # readable by others, even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # The umask can only remove bits; force exactly 0600 whatever it was.
        os.fchmod(fd, 0o600)
        data = content.encode("ascii")
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        # Do not leave an empty or partial secret behind: a later run would refuse to
        # overwrite it and a reader would find garbage.
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
