"""Canonical JSON (RFC 8785 JCS) and a strict parser for untrusted payload bytes.

``ubc`` tools produce payloads with :func:`canonical_json`. The server never re-serializes a
payload: it verifies and stores the exact bytes it received, so what it must guarantee is
that every accepted payload means exactly one thing. :func:`parse_payload` therefore refuses
everything a lenient JSON parser would smooth over: duplicate keys (two readers could pick
different values), floats and exponents (amounts are integers; ``1e3`` and ``1000.0`` would
otherwise be "the same" amount spelled differently), NaN/Infinity (not JSON at all), lone
surrogate escapes (not Unicode), deep nesting (cheap stack exhaustion) and integers outside
the signed 64-bit range (other implementations would overflow or round them).
"""

from __future__ import annotations

import json
import re
from typing import Any, cast

import orjson
import rfc8785

__all__ = [
    "MAX_DEPTH",
    "PayloadError",
    "canonical_json",
    "is_canonical",
    "parse_payload",
]

# A top-level object counts as depth 1. No payload type needs more than a few levels.
MAX_DEPTH = 8

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# Longest decimal spelling of an int64 ("-9223372036854775808"); anything longer is out of
# range, and refusing it before int() avoids quadratic conversion of huge digit strings.
_MAX_INT_CHARS = 20

# Nesting limit for objects given to canonical_json by our own code; only there to turn a
# runaway structure into a clean error instead of a RecursionError.
_CANONICAL_MAX_DEPTH = 32


class PayloadError(ValueError):
    """A payload (or a value to canonicalize) is not acceptable; the message says why."""


def canonical_json(obj: object) -> bytes:
    """Return the RFC 8785 (JCS) serialization of ``obj`` as UTF-8 bytes.

    Only JSON values the ledger uses are accepted: ``dict`` with ``str`` keys, ``list`` or
    ``tuple``, ``str``, ``int`` (JCS limits them to the exactly representable range
    ±(2^53-1)), ``bool`` and ``None``. Floats are refused like in :func:`parse_payload`, so
    that a payload we produce is one we would accept. Raises :class:`PayloadError`.
    """
    _check_canonicalizable(obj, 1)
    try:
        # Checked above to be a JSON value of the kinds rfc8785 accepts.
        result: bytes = rfc8785.dumps(cast(Any, obj))
    except rfc8785.CanonicalizationError as e:
        raise PayloadError(f"cannot canonicalize: {e}") from None
    return result


def parse_payload(data: bytes) -> dict[str, Any]:
    """Parse untrusted payload bytes strictly into a ``dict``.

    The bytes must be UTF-8 holding one JSON object, with no duplicate keys at any level, no
    floats, exponents, NaN or Infinity, no lone surrogate escapes or NUL characters in
    strings, integers within the
    signed 64-bit range and nesting at most :data:`MAX_DEPTH` deep. Anything else raises
    :class:`PayloadError` with a message naming the problem. Canonical form is *not*
    required here; see :func:`is_canonical`.
    """
    if not isinstance(data, bytes):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    fast = _parse_canonical(data)
    if fast is not None:
        return fast
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"payload is not valid UTF-8 (byte offset {e.start})") from None
    # Check nesting before parsing: the stdlib parser recurses once per level and would
    # raise RecursionError (or worse) on adversarial input long before our limit applies.
    # (No deeper than the number of opening brackets: most payloads need no count.)
    if text.count("{") + text.count("[") > MAX_DEPTH and _max_nesting(text) > MAX_DEPTH:
        raise PayloadError(f"payload nesting is deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_float=_refuse_float,
            parse_int=_bounded_int,
            parse_constant=_refuse_constant,
        )
    except json.JSONDecodeError as e:
        raise PayloadError(
            f"payload is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(value, dict):
        raise PayloadError(f"payload must be a JSON object, got {_json_kind(value)}")
    # Valid UTF-8 holds no surrogates and JSON no raw control characters: a lone surrogate
    # or a NUL can only come from a \u escape.
    if "\\u" in text:
        _check_strings(value)
    return value


def is_canonical(data: bytes) -> bool:
    """Return True if ``data`` is a valid payload already in RFC 8785 canonical form.

    That is: :func:`parse_payload` accepts it and :func:`canonical_json` of the result gives
    back exactly ``data``. Never raises for bad input; it just returns False.
    """
    try:
        return canonical_json(parse_payload(data)) == data
    except PayloadError:
        return False


# --- helpers -------------------------------------------------------------------------------


def _parse_canonical(data: bytes) -> dict[str, Any] | None:
    """The fast path of :func:`parse_payload`: the value of ``data`` when it is certain
    the strict parser gives the same one, else None (the strict parser then decides).

    Certain means: ``data`` is ASCII without ``\\u`` escapes (so no lone surrogate, no NUL
    and code point order of keys is RFC 8785's UTF-16 order), orjson reads it as an
    object, the value holds only objects, arrays, strings, booleans, null and integers
    (orjson reads integers beyond 64 bits as floats) within the signed 64-bit range, at
    most :data:`MAX_DEPTH` deep, and serializing that value back compactly with sorted
    keys gives exactly ``data``. The last excludes duplicate keys (the value keeps one of
    them), whitespace, any other spelling of a number or string, and trailing bytes. This
    is the form canonical_json gives for such values, which is what clients send.
    """
    if not data.isascii() or b"\\u" in data:
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or not _plain(value, 1):
        return None
    try:
        again = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return value if again == data else None


def _plain(value: Any, depth: int) -> bool:
    """True if ``value`` (an object or array at nesting ``depth``) holds no float, no
    integer outside the signed 64-bit range and no container deeper than
    :data:`MAX_DEPTH`."""
    if depth > MAX_DEPTH:
        return False
    items: Any = value.values() if type(value) is dict else value
    for item in items:
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if not _INT64_MIN <= item <= _INT64_MAX:
                return False
        elif kind is dict or kind is list:
            if not _plain(item, depth + 1):
                return False
        else:
            return False
    return True


# One JSON string literal (escapes included); used to blank strings out before counting
# brackets. Unrolled-loop form so matching stays linear.
_STRING_LITERAL = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _max_nesting(text: str) -> int:
    """Deepest bracket nesting of ``text`` outside string literals.

    Exact for valid JSON; for invalid JSON it may be anything, which is fine because such
    input is refused either way.
    """
    stripped = _STRING_LITERAL.sub('""', text)
    depth = deepest = 0
    for m in _BRACKET.finditer(stripped):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise PayloadError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _refuse_float(s: str) -> Any:
    raise PayloadError(f"floats and exponents are not allowed (number {s})")


def _refuse_constant(s: str) -> Any:
    raise PayloadError(f"{s} is not allowed in a payload")


def _bounded_int(s: str) -> int:
    if len(s) > _MAX_INT_CHARS:
        raise PayloadError(f"integer out of 64-bit range ({s[:24]}...)")
    n = int(s)
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise PayloadError(f"integer out of 64-bit range ({s})")
    return n


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates (from ``\\ud800``-style escapes) and NUL characters (which no
    PostgreSQL text column can hold) in keys and string values."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise PayloadError(f"string contains an unpaired surrogate escape: {value!r}")
        if "\x00" in value:
            raise PayloadError(f"string contains a NUL character: {value!r}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def _check_canonicalizable(obj: object, depth: int) -> None:
    if depth > _CANONICAL_MAX_DEPTH:
        raise PayloadError(f"cannot canonicalize: nesting deeper than {_CANONICAL_MAX_DEPTH}")
    if isinstance(obj, float):
        raise PayloadError(f"cannot canonicalize: floats are not allowed ({obj!r})")
    if isinstance(obj, str):
        if _SURROGATE.search(obj):
            raise PayloadError(f"cannot canonicalize: unpaired surrogate in {obj!r}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise PayloadError(f"cannot canonicalize: object key {k!r} is not a string")
            _check_canonicalizable(k, depth)
            _check_canonicalizable(v, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_canonicalizable(v, depth + 1)


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__
