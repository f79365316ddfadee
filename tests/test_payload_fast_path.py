"""The fast path of ``parse_payload`` (orjson, canonical bytes only) against the strict path.

Whatever the bytes, the fast path either declines (None) or returns exactly what the
strict parser returns: same keys in the same order, same values of the same types. And
``parse_payload`` as a whole gives the same value or the same refusal as the strict path.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubc.signing import canonical
from ubc.signing.canonical import PayloadError, canonical_json, parse_payload


def strict(data: bytes) -> Any:
    """The strict parser alone (the fast path switched off)."""
    saved = canonical._parse_canonical
    canonical._parse_canonical = lambda data: None  # type: ignore[assignment]
    try:
        return parse_payload(data)
    finally:
        canonical._parse_canonical = saved


def outcome(parse: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", _typed(parse(data))
    except PayloadError:
        return "refused", None


def _typed(value: Any) -> Any:
    """The value with its types and key order made visible to ==."""
    if isinstance(value, dict):
        return ("dict", [(k, _typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_typed(v) for v in value])
    return (type(value).__name__, value)


def check(data: bytes) -> None:
    expected = outcome(strict, data)
    fast = canonical._parse_canonical(data)
    if fast is not None:
        assert ("ok", _typed(fast)) == expected, data
    assert outcome(parse_payload, data) == expected, data


# Strings that stress escapes: ASCII, controls, NUL, quotes, backslashes, non-BMP and
# private-use characters, and lone surrogates (as escapes, since UTF-8 cannot hold them).
_chars = st.one_of(
    st.sampled_from(list('az09"\\/\x00\x01\n\t\x7f\u00e9\ue000\uffff\U0001f600')),
    st.characters(),
)
_text = st.text(_chars, max_size=6)
_ints = st.one_of(
    st.integers(-5, 5),
    st.sampled_from([2**53 - 1, 2**53, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30]),
    st.integers(),
)
_scalars = st.one_of(st.none(), st.booleans(), _ints, _text, st.floats(allow_nan=False))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(_text, inner), max_size=3),  # pairs: duplicate keys possible
    ),
    max_leaves=12,
)


def _render(value: Any, style: int) -> str:
    """JSON text of ``value`` (pairs lists are objects, in their order, duplicates kept) in
    one of a few spellings: compact, spaced, ASCII-escaped, sorted or not."""
    sep = ("," if style & 1 == 0 else ", ", ":" if style & 1 == 0 else ": ")
    ascii_only = bool(style & 2)
    if isinstance(value, list) and all(isinstance(p, tuple) for p in value) and value:
        pairs = sorted(value, key=lambda p: p[0]) if style & 4 else value
        inner = sep[0].join(
            json.dumps(k, ensure_ascii=ascii_only) + sep[1] + _render(v, style) for k, v in pairs
        )
        return "{" + inner + "}"
    if isinstance(value, list):
        return "[" + sep[0].join(_render(v, style) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_text, _values), max_size=4), st.integers(0, 7))
def test_random_objects_same_verdict(pairs: list[tuple[str, Any]], style: int) -> None:
    text = _render(pairs, style) if pairs else "{}"
    data = text.encode("utf-8", "surrogatepass")
    check(data)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1), _text),
        max_size=5,
    )
)
def test_canonical_payloads_take_the_fast_path_when_ascii(value: dict[str, Any]) -> None:
    try:
        data = canonical_json(value)
    except PayloadError:
        return
    check(data)
    if data.isascii() and b"\\u" not in data:
        assert canonical._parse_canonical(data) == value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_random_bytes_same_verdict(data: bytes) -> None:
    check(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1,"a":2}',
        b'{"a":{"b":1,"b":1}}',
        b'{"a":1.0}',
        b'{"a":1e3}',
        b'{"a":1E400}',
        b'{"a":-0}',
        b'{"a":9223372036854775807}',
        b'{"a":9223372036854775808}',
        b'{"a":-9223372036854775809}',
        b'{"a":18446744073709551616}',
        b'{"a":"\\u0000"}',
        b'{"a":"\\ud800"}',
        b'{"a":"\\ud83d\\ude00"}',
        b'{"\xee\x80\x80":1,"\xf0\x9f\x98\x80":2}',
        b'{"\xf0\x9f\x98\x80":2,"\xee\x80\x80":1}',
        b'{"b":1,"a":2}',
        b'{"a":1} ',
        b' {"a":1}',
        b'{"a":1}x',
        b'\xef\xbb\xbf{"a":1}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b"[1]",
        b'"a"',
        b'{"a":[[[[[[[1]]]]]]]}',
        b'{"a":[[[[[[[[1]]]]]]]]}',
        b'{"a":"\\/"}',
        b'{"a":"\x7f"}',
        b'{"a":"\\n\\t"}',
        b'{"a":true,"b":false,"c":null}',
        b"{}",
        b"",
    ],
)
def test_edge_cases_same_verdict(data: bytes) -> None:
    check(data)


def test_deep_nesting_is_refused_by_both() -> None:
    data = b'{"a":' + b"[" * 9 + b"]" * 9 + b"}"
    assert canonical._parse_canonical(data) is None
    with pytest.raises(PayloadError, match="nesting"):
        parse_payload(data)


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: "{" + str(u) + "}"),
        st.uuids().map(lambda u: "urn:uuid:" + str(u)),
        st.uuids().map(lambda u: str(u) + "\n"),
        st.text(st.sampled_from(list("0af-9F{}:\n\u0660x")), max_size=40),
    )
)
def test_uuid_check_matches_the_uuid_module(value: str) -> None:
    """The payload schemas' UUID check (a pattern first) accepts exactly the strings that
    uuid.UUID reads and writes back unchanged, with the same messages otherwise."""
    import uuid

    from ubc.rules.payload import _uuid

    try:
        expected: object = str(uuid.UUID(value)) == value or "must be a UUID in lowercase"
    except ValueError:
        expected = "must be a UUID"
    try:
        got: object = _uuid(value) == value
    except ValueError as exc:
        got = "must be a UUID in lowercase" if "lowercase" in str(exc) else str(exc)
    assert got == expected
