"""The strict payload machinery every domain's payload schemas are built on.

Each payload is a strict JSON object: unknown fields, wrong types and floats are refused.
Amounts are integers 1 ≤ amount ≤ 2^53−1; addresses are always full (``member:alice``).
The schemas themselves live with their domains (``ubc/<domain>/payloads.py``).
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from ubc.errors import InvalidPayload

MAX_PAYLOAD_BYTES = 8 * 1024
MAX_AMOUNT = 2**53 - 1

# The first character as the ledger's address rule wants it (member:<handle>).
HANDLE_PATTERN = r"^[a-z0-9][a-z0-9_-]{2,31}$"
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{1,63}$"
ADDRESS_PATTERN = r"^(member:[a-z0-9][a-z0-9_-]{2,31}|cause:[a-z0-9][a-z0-9-]{1,63})$"
ACTOR_PATTERN = r"^(member:[a-z0-9][a-z0-9_-]{2,31}|operator|ledger)$"
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


# The lowercase hyphenated form: exactly the strings str(uuid.UUID(s)) gives back
# unchanged, so matching it is the whole check below, without building a UUID.
_UUID_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(value: str) -> str:
    if _UUID_FORM.fullmatch(value):
        return value
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError("must be a UUID") from None
    if str(parsed) != value:
        raise ValueError("must be a UUID in lowercase hyphenated form")
    return value


def _timestamp(value: str) -> str:
    if not _RFC3339_UTC.match(value):
        raise ValueError("must be an RFC 3339 UTC timestamp like 2026-01-31T12:00:00Z")
    parse_timestamp(value)
    return value


def parse_timestamp(value: str) -> datetime:
    """The aware datetime of an RFC 3339 UTC timestamp (beyond microseconds truncated)."""
    # The pattern was checked by the schema; fromisoformat (3.11) reads "Z" and any fraction.
    return datetime.fromisoformat(value)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, as ubc writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Uuid = Annotated[str, AfterValidator(_uuid)]
Timestamp = Annotated[str, AfterValidator(_timestamp)]
Handle = Annotated[str, StringConstraints(pattern=HANDLE_PATTERN)]
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN)]
Address = Annotated[str, StringConstraints(pattern=ADDRESS_PATTERN)]
AssetCode = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9]{1,15}$")]
Amount = Annotated[int, Field(ge=1, le=MAX_AMOUNT)]
PublicKey = Annotated[str, StringConstraints(min_length=44, max_length=44)]
KeyHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Memo = Annotated[str, StringConstraints(max_length=256)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(max_length=2000)]
ExternalRef = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Payload(BaseModel):
    """Fields every payload carries."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ledger: str = Field(description="the ledger origin; stops cross-ledger replay")
    id: Uuid = Field(description="UUID chosen by the signer: the idempotency key")
    created_at: Timestamp = Field(description="RFC 3339 UTC, checked against a skew window")
    actor: Annotated[str, StringConstraints(pattern=ACTOR_PATTERN)] = Field(
        description="the signer's address: member:<handle>, operator or ledger"
    )

    # Fields of text written by people and shown to others (see ``check_text``), by their
    # wire name; ``multiline_text`` may also hold line feeds and tabs.
    human_text: ClassVar[tuple[str, ...]] = ()
    multiline_text: ClassVar[frozenset[str]] = frozenset()


def validate(model: type[Payload], body: dict[str, Any]) -> Payload:
    """Validate a parsed payload against ``model``; ValueError with a clear message."""
    try:
        return model.model_validate(body, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None


def payload_json(payload: Payload) -> dict[str, Any]:
    """The JSON object of ``payload`` with wire names, leaving out unset optional fields."""
    return payload.model_dump(by_alias=True, exclude_none=True)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "payload"
        kind = error["type"]
        if kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif kind == "missing":
            parts.append(f"missing field {where!r}")
        else:
            parts.append(f"field {where!r}: {error['msg']}")
    return "; ".join(parts)


# --- human text -------------------------------------------------------------------------

# Characters that change how the text around them displays without showing themselves.
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
# Invisible characters that are not of category Cf (format) but display as nothing:
# the combining grapheme joiner, Hangul and Khmer fillers.
INVISIBLE_LETTERS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0")
MULTILINE_CONTROLS = frozenset("\n\t")


def refused_character(char: str, *, multiline: bool = False) -> str | None:
    """What is wrong with ``char`` in human text, or None if it may appear there."""
    if char in BIDI_CONTROLS:
        return "a bidirectional control"
    category = unicodedata.category(char)
    if category == "Cf" or char in INVISIBLE_LETTERS:
        return "an invisible character"
    if category == "Cc" and not (multiline and char in MULTILINE_CONTROLS):
        return "a control character"
    if category in ("Zl", "Zp"):
        return "a line or paragraph separator"
    return None


def check_text(payload: Payload) -> None:
    """Refuse (``InvalidPayload``, 400 naming the field) human text that would display as
    something other than what it is.

    The human text fields are memos, display names, API key labels (and their model
    lists), a member update's reason, external references, and a cause's name and
    description. They may not hold:

    - bidirectional controls (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069),
      which reorder what follows them ("Trojan Source");
    - invisible characters: every format character (category Cf: zero-width space,
      non-joiner and joiner U+200B–U+200D, word joiner and invisible operators
      U+2060–U+2064, U+FEFF, U+180E, the soft hyphen U+00AD, tag characters, …) and the
      fillers that display as nothing (U+034F, U+115F, U+1160, U+17B4, U+17B5, U+3164,
      U+FFA0);
    - control characters (category Cc: C0, DEL and C1, among them ESC, which drives a
      terminal, and CR), except line feed and tab in a cause's description; and the line
      and paragraph separators U+2028 and U+2029.

    Refused, not normalised: the signed bytes are stored and journaled as they are, so
    the server cannot change them, and a client should know that its text was not taken.
    The zero-width joiner is refused too, and with it emoji sequences and the few words
    of some scripts that need one: a display name or memo can do without them.

    This rule is checked at submission only, like the ``created_at`` window, never when
    the auditor or ``restore`` replays a journal: entries accepted before the rule
    existed still verify.
    """
    model = type(payload)
    for name, value in _human_texts(payload):
        multiline = name in model.multiline_text
        for position, char in enumerate(value):
            problem = refused_character(char, multiline=multiline)
            if problem is not None:
                code = f"U+{ord(char):04X}"
                label = unicodedata.name(char, "")
                raise InvalidPayload(
                    f"field {name!r} holds {problem} ({code}{' ' + label if label else ''}) "
                    f"at position {position}: text must display as what it is",
                    detail={"field": name, "character": code, "position": position},
                )


def _human_texts(payload: Payload) -> Iterator[tuple[str, str]]:
    fields = payload_json(payload)
    for name in type(payload).human_text:
        value = fields.get(name)
        if isinstance(value, str):
            yield name, value
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    yield name, item
