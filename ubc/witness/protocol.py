"""The ``add-checkpoint`` call of C2SP ``tlog-witness`` (c2sp.org/tlog-witness).

Request body::

    old <size>\\n
    <base64 consistency proof hash>\\n      (0 to 63 lines)
    \\n
    <signed checkpoint note>

What the witness answers (the status codes are the specification's):

====  =====================================================================================
200   the checkpoint is consistent with what the witness saw: the cosignature line(s)
400   a malformed body or checkpoint, or an old size larger than the checkpoint's
403   no signature of a key the witness trusts for the origin verifies
404   the origin is not one the witness is configured for
409   the old size is not the witness's size for the origin (body: that size and a
      newline, ``Content-Type: text/x.tlog.size``); or the sizes are equal and the roots
      differ
422   the consistency proof does not verify (a proof with an old size of 0 must be empty)
====  =====================================================================================

The checks and the update are atomic per origin: the stored checkpoint is replaced only
if its size is still the one the request was checked against (compare-and-swap).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ubc.journal.checkpoint import Checkpoint, parse_checkpoint
from ubc.journal.merkle import HASH_SIZE, ProofError, verify_consistency
from ubc.signing.note import NoteError, NoteVerifier, parse_signature_line
from ubc.witness.cosignature import Cosigner, split_note
from ubc.witness.store import MAX_STORED_SIZE, WitnessStore

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_PROOF_LINES",
    "SIZE_CONTENT_TYPE",
    "AddCheckpoint",
    "Answer",
    "Witness",
    "WitnessRefusal",
    "format_add_checkpoint",
    "parse_add_checkpoint",
    "parse_log_option",
]

SIZE_CONTENT_TYPE = "text/x.tlog.size"
MAX_PROOF_LINES = 63
MAX_BODY_BYTES = 64 * 1024
"""The largest request body read: 63 proof lines and a checkpoint with 100 signature
lines are far below it."""

_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)


class WitnessRefusal(Exception):
    """The witness does not cosign: an HTTP status, a reason, and for 409 its size."""

    def __init__(self, status: int, reason: str, *, size: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.size = size


@dataclass(frozen=True)
class AddCheckpoint:
    """A parsed add-checkpoint request: old size, proof hashes, the signed checkpoint."""

    old: int
    proof: tuple[bytes, ...]
    note: str


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, body, content type."""

    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


def _bad(reason: str) -> WitnessRefusal:
    return WitnessRefusal(400, reason)


def format_add_checkpoint(old: int, proof: Iterable[bytes], note: str) -> str:
    """The request body for ``old``, the proof hashes and the signed checkpoint ``note``."""
    lines = [f"old {old}", *(base64.b64encode(h).decode("ascii") for h in proof)]
    return "".join(line + "\n" for line in lines) + "\n" + note


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Parse a request body strictly; :class:`WitnessRefusal` (400) if malformed."""
    if len(body) > MAX_BODY_BYTES:
        raise _bad(f"request body over {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("request body is not UTF-8") from None
    line, sep, rest = text.partition("\n")
    if not sep or not line.startswith("old "):
        raise _bad("the body must start with an 'old <size>' line")
    size_text = line.removeprefix("old ")
    if not _DECIMAL_RE.fullmatch(size_text):
        raise _bad(f"old size {size_text!r} is not a decimal without leading zeroes")
    old = int(size_text)
    if old > MAX_STORED_SIZE:
        raise _bad(f"old size {old} is too large")
    proof: list[bytes] = []
    while True:
        line, sep, rest = rest.partition("\n")
        if not sep:
            raise _bad("no empty line before the checkpoint")
        if not line:
            break
        if len(proof) == MAX_PROOF_LINES:
            raise _bad(f"more than {MAX_PROOF_LINES} consistency proof lines")
        try:
            digest = base64.b64decode(line.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise _bad(f"proof line {len(proof) + 1} is not base64") from None
        if len(digest) != HASH_SIZE or base64.b64encode(digest).decode("ascii") != line:
            raise _bad(f"proof line {len(proof) + 1} is not a base64 {HASH_SIZE}-byte hash")
        proof.append(digest)
    if not rest:
        raise _bad("no checkpoint after the empty line")
    return AddCheckpoint(old, tuple(proof), rest)


def parse_log_option(value: str) -> tuple[str, NoteVerifier]:
    """``ORIGIN=VKEY`` (a log the witness follows): the origin and the log's verifier.

    Raises ``ValueError`` with a message naming what is wrong.
    """
    origin, sep, vkey = value.partition("=")
    if not sep or not origin or not vkey:
        raise ValueError(f"{value!r} is not ORIGIN=VKEY")
    if any(c.isspace() or ord(c) < 0x20 for c in origin):
        raise ValueError(f"origin {origin!r} contains spaces or control characters")
    try:
        verifier = NoteVerifier.from_vkey(vkey)
    except NoteError as exc:
        raise ValueError(f"the vkey of {origin}: {exc}") from None
    return origin, verifier


class Witness:
    """Checks add-checkpoint requests against the store, and cosigns.

    ``logs`` maps each origin to the verifiers of the keys trusted for it.
    """

    def __init__(
        self,
        cosigner: Cosigner,
        logs: Mapping[str, Sequence[NoteVerifier]],
        store: WitnessStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cosigner = cosigner
        self.logs = {origin: tuple(keys) for origin, keys in logs.items()}
        self.store = store
        self._clock = clock

    def handle(self, body: bytes) -> Answer:
        """The answer to one request body."""
        try:
            return Answer(200, self.add_checkpoint(parse_add_checkpoint(body)))
        except WitnessRefusal as refusal:
            if refusal.size is not None:
                return Answer(refusal.status, f"{refusal.size}\n", SIZE_CONTENT_TYPE)
            return Answer(refusal.status, refusal.reason + "\n")

    def add_checkpoint(self, request: AddCheckpoint) -> str:
        """Check the request, store the checkpoint, return the cosignature line(s)."""
        body, checkpoint = self._parse_note(request.note)
        keys = self.logs.get(checkpoint.origin)
        if keys is None:
            raise WitnessRefusal(404, f"unknown log origin {checkpoint.origin!r}")
        self._check_signature(request.note, body, keys)
        if checkpoint.size > MAX_STORED_SIZE:
            raise _bad(f"tree size {checkpoint.size} is too large")
        if request.old > checkpoint.size:
            raise _bad(f"old size {request.old} is larger than the checkpoint's {checkpoint.size}")
        stored = self.store.get(checkpoint.origin)
        known = 0 if stored is None else stored.size
        if request.old != known:
            raise WitnessRefusal(409, "old size is not the witness's", size=known)
        if stored is not None and stored.size == checkpoint.size:
            if stored.root_hash != checkpoint.root:
                raise WitnessRefusal(
                    409, f"the root of size {checkpoint.size} differs from the one cosigned"
                )
            if request.proof:
                raise WitnessRefusal(422, "the consistency proof between equal sizes is not empty")
        elif stored is None or request.old == 0:
            if request.proof:
                raise WitnessRefusal(422, "the consistency proof from size 0 must be empty")
        else:
            try:
                verify_consistency(
                    stored.size,
                    checkpoint.size,
                    stored.root_hash,
                    checkpoint.root,
                    request.proof,
                )
            except ProofError as exc:
                raise WitnessRefusal(422, f"the consistency proof does not verify: {exc}") from None
        if not self.store.swap(
            checkpoint.origin,
            request.old,
            size=checkpoint.size,
            root_hash=checkpoint.root,
            checkpoint=request.note,
        ):
            # Another request moved the origin on between our read and our write.
            raise WitnessRefusal(
                409, "old size is not the witness's", size=self.store.size(checkpoint.origin)
            )
        return self.cosigner.sign(body, int(self._clock()))

    @staticmethod
    def _parse_note(note: str) -> tuple[str, Checkpoint]:
        try:
            body, _ = split_note(note)
            return body, parse_checkpoint(body)
        except (NoteError, ValueError) as exc:
            raise _bad(f"malformed checkpoint: {exc}") from None

    @staticmethod
    def _check_signature(note: str, body: str, keys: Sequence[NoteVerifier]) -> None:
        """At least one line of a trusted key verifies, and none of them fails (a note
        with a bad signature by a trusted key is refused whole, as signed-note says);
        lines of other keys are ignored."""
        _, lines = split_note(note)
        message = body.encode("utf-8")
        verified = False
        for number, line in enumerate(lines, start=1):
            name, key_hash, signature = parse_signature_line(line, number)
            for key in keys:
                if name != key.name or key_hash != key.key_hash:
                    continue
                try:
                    VerifyKey(key.public_key).verify(message, signature)
                except (BadSignatureError, ValueError):
                    raise WitnessRefusal(
                        403, f"the signature by {key.name}+{key.key_hash.hex()} does not verify"
                    ) from None
                verified = True
        if not verified:
            raise WitnessRefusal(403, "no signature by a key trusted for this origin")
