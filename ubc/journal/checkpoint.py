"""C2SP tlog-checkpoint note bodies and C2SP tlog-proof files.

A checkpoint body is ``<origin>\\n<size>\\n<base64 root>\\n`` plus optional non-empty
extension lines; signing it as a C2SP signed note is done elsewhere. A tlog-proof file
bundles an entry index, its inclusion proof and the signed checkpoint it verifies
against, for offline ("transparent signature") verification::

    c2sp.org/tlog-proof@v1
    [extra <base64 opaque data>]
    index <N>
    <base64 proof hash>...

    <signed checkpoint note, verbatim>

Parsers are strict: they accept only what the formatters produce (canonical decimals,
canonical base64, no stray lines), since the output is compared and hashed by auditors.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ubc.journal.merkle import HASH_SIZE

__all__ = [
    "TLOG_PROOF_HEADER",
    "Checkpoint",
    "TlogProof",
    "format_checkpoint",
    "format_tlog_proof",
    "parse_checkpoint",
    "parse_tlog_proof",
]

TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1"

_UINT64_MAX = 2**64 - 1
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)
# Signed notes must not contain ASCII control characters other than newline.
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f]")


@dataclass(frozen=True)
class Checkpoint:
    """A parsed checkpoint body: origin, tree size, root hash and extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlogProof:
    """A parsed tlog-proof: entry index, inclusion proof, signed checkpoint note, extra."""

    index: int
    proof: tuple[bytes, ...]
    checkpoint: str
    extra: bytes | None = None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    """Strict standard base64: right alphabet, padding, and canonical trailing bits."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64") from exc
    if _b64encode(raw) != text:
        raise ValueError(f"{what} is not canonical base64")
    return raw


def _parse_decimal(text: str, what: str) -> int:
    if not _DECIMAL_RE.fullmatch(text):
        raise ValueError(f"{what} {text!r} is not a decimal without leading zeroes")
    value = int(text)
    if value > _UINT64_MAX:
        raise ValueError(f"{what} {value} does not fit in 64 bits")
    return value


def _check_line(line: str, what: str) -> None:
    if not line:
        raise ValueError(f"{what} must not be empty")
    if "\n" in line or _CONTROL_RE.search(line):
        raise ValueError(f"{what} must not contain newlines or control characters")


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """Return the checkpoint note body ``<origin>\\n<size>\\n<base64 root>\\n[ext\\n...]``."""
    _check_line(origin, "origin")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _UINT64_MAX:
        raise ValueError(f"size must be an integer in [0, 2**64), got {size!r}")
    if len(root) != HASH_SIZE:
        raise ValueError(f"root must be {HASH_SIZE} bytes, got {len(root)}")
    for ext in extensions:
        _check_line(ext, "extension line")
    lines = [origin, str(size), _b64encode(bytes(root)), *extensions]
    return "".join(line + "\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note body (not the signatures); ``ValueError`` if malformed."""
    if not text.endswith("\n"):
        raise ValueError("checkpoint must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise ValueError("checkpoint needs origin, size and root lines")
    for i, line in enumerate(lines):
        # An empty line would be the note/signature separator: pass the body only.
        _check_line(line, f"checkpoint line {i + 1}")
    origin, size_text, root_text, *extensions = lines
    size = _parse_decimal(size_text, "tree size")
    root = _b64decode(root_text, "root hash")
    if len(root) != HASH_SIZE:
        raise ValueError(f"root hash is {len(root)} bytes, want {HASH_SIZE}")
    return Checkpoint(origin, size, root, tuple(extensions))


def format_tlog_proof(
    index: int, proof: Sequence[bytes], checkpoint: str, extra: bytes | None = None
) -> str:
    """Return a ``c2sp.org/tlog-proof@v1`` file.

    ``checkpoint`` is the signed checkpoint note, included verbatim. ``extra`` is opaque,
    unauthenticated application data (omitted when None).
    """
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= _UINT64_MAX:
        raise ValueError(f"index must be an integer in [0, 2**64), got {index!r}")
    for i, digest in enumerate(proof):
        if len(digest) != HASH_SIZE:
            raise ValueError(f"proof[{i}] must be {HASH_SIZE} bytes")
    _check_signed_note(checkpoint)
    out = [TLOG_PROOF_HEADER + "\n"]
    if extra is not None:
        out.append(f"extra {_b64encode(bytes(extra))}\n")
    out.append(f"index {index}\n")
    out.extend(_b64encode(bytes(digest)) + "\n" for digest in proof)
    out.append("\n")
    out.append(checkpoint)
    return "".join(out)


def _check_signed_note(note: str) -> None:
    if not note or not note.endswith("\n"):
        raise ValueError("checkpoint note must be non-empty and end with a newline")
    if note.startswith("\n"):
        raise ValueError("checkpoint note must not start with an empty line")
    if _CONTROL_RE.search(note):
        raise ValueError("checkpoint note must not contain control characters")


def parse_tlog_proof(text: str) -> TlogProof:
    """Parse a ``c2sp.org/tlog-proof@v1`` file; ``ValueError`` if malformed.

    The checkpoint note is returned verbatim and is NOT verified here: the caller must
    verify its signatures, parse it with ``parse_checkpoint`` and check the inclusion
    proof against it. ``extra`` is unauthenticated.
    """
    header, sep, rest = text.partition("\n")
    if header != TLOG_PROOF_HEADER or not sep:
        raise ValueError(f"tlog-proof must start with {TLOG_PROOF_HEADER!r}")
    line, sep, rest = rest.partition("\n")
    extra: bytes | None = None
    if line.startswith("extra "):
        extra = _b64decode(line.removeprefix("extra "), "extra data")
        line, sep, rest = rest.partition("\n")
    if not sep or not line.startswith("index "):
        raise ValueError("tlog-proof is missing its index line")
    index = _parse_decimal(line.removeprefix("index "), "index")
    proof: list[bytes] = []
    while True:
        line, sep, rest = rest.partition("\n")
        if not sep:
            raise ValueError("tlog-proof is missing the empty line before the checkpoint")
        if not line:
            break
        digest = _b64decode(line, f"proof hash {len(proof)}")
        if len(digest) != HASH_SIZE:
            raise ValueError(f"proof hash {len(proof)} is {len(digest)} bytes, want {HASH_SIZE}")
        proof.append(digest)
    _check_signed_note(rest)
    return TlogProof(index, tuple(proof), rest, extra)
