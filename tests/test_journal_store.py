"""The journal's fast entry encoder is RFC 8785 for every entry ubc writes."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from ubc.journal.store import encode_entry
from ubc.signing import canonical_json

ascii_text = st.text(alphabet=string.printable, max_size=40)
ints = st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
effect = st.fixed_dictionaries(
    {
        "transfer_id": ascii_text,
        "kind": ascii_text,
        "debit": ascii_text,
        "credit": ascii_text,
        "asset": ascii_text,
        "amount": ints,
        "phase": ascii_text,
    },
    optional={"pending_id": ascii_text},
)
envelope = st.fixed_dictionaries(
    {
        "payloadType": ascii_text,
        "payload": ascii_text,
        "signatures": st.lists(
            st.fixed_dictionaries({"keyid": ascii_text, "sig": ascii_text}), max_size=3
        ),
    }
)


@given(
    seq=st.integers(min_value=0, max_value=2**53 - 1),
    committed_at=ascii_text,
    env=envelope,
    effects=st.lists(effect, max_size=4),
)
def test_encode_entry_equal_rfc8785(
    seq: int, committed_at: str, env: dict[str, object], effects: list[dict[str, object]]
) -> None:
    entry = {"seq": seq, "committed_at": committed_at, "envelope": env, "effects": effects}
    assert encode_entry(entry) == canonical_json(entry)
