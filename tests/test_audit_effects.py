"""Recorded effects sent as ``Effect`` tuples (``compact_effects``) compare with derived
effects exactly as their JSON objects do, and read back as they were."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ubc.audit.verify import effects_differ
from ubc.audit.workers import compact_effects, effects_json
from ubc.ledger.engine import Effect

_text = st.sampled_from(["a", "b", "posted", "transfer", "member:x", "CU"])
_value = st.one_of(_text, st.integers(-2, 3), st.booleans(), st.none(), st.just(1.0))
_effects = st.lists(
    st.builds(
        Effect,
        _text,
        _text,
        _text,
        _text,
        _text,
        st.integers(0, 3),
        _text,
        st.one_of(st.none(), _text),
    ),
    max_size=3,
)


@st.composite
def recorded_of(draw: st.DrawFn, derived: list[Effect]) -> Any:
    """The derived effects' JSON, perhaps changed: a value, a key added or dropped, an
    explicit null ``pending_id``, one effect more or fewer, or not a list at all."""
    out: list[Any] = [e.to_json() for e in derived]
    for _ in range(draw(st.integers(0, 2))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        if not isinstance(out[i], dict):
            continue
        body = dict(out[i])
        change = draw(st.sampled_from(["value", "add", "drop", "null", "not a dict"]))
        key = draw(st.sampled_from([*Effect._fields, "extra"]))
        if change == "value":
            body[key] = draw(_value)
        elif change == "add":
            body[key] = draw(_value)
        elif change == "drop":
            body.pop(key, None)
        elif change == "null":
            body["pending_id"] = None
        out[i] = body if change != "not a dict" else draw(_value)
    shape = draw(st.sampled_from(["same", "more", "fewer", "other"]))
    if shape == "more":
        out.append(out[-1] if out else {"kind": "x"})
    elif shape == "fewer" and out:
        out.pop()
    elif shape == "other":
        return draw(st.one_of(_value, st.just({})))
    return out


@settings(max_examples=2000, deadline=None)
@given(data=st.data(), derived=_effects)
def test_compact_comparison_is_the_json_comparison(
    data: st.DataObject, derived: list[Effect]
) -> None:
    recorded = data.draw(recorded_of(derived))
    compact = compact_effects(recorded)
    assert effects_json(compact) == recorded
    assert effects_differ(derived, compact) == ([e.to_json() for e in derived] != recorded)


def test_exact_effects_are_compacted() -> None:
    effects = [Effect("t:0", "transfer", "member:a", "member:b", "CU", 5, "posted")]
    compact = compact_effects([e.to_json() for e in effects])
    assert compact == tuple(effects)
    assert not effects_differ(effects, compact)
