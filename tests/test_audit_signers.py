"""The in-memory auditor's shortcut for the common signer (one member key, verified by a
worker) gives exactly what ``authenticate`` gives, and steps aside for everything else."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ubc.audit.verify import Report, _MemoryReplayer
from ubc.errors import UbcError
from ubc.rules import KeyInfo, MemberInfo, authenticate
from ubc.rules.writing import LedgerContext
from ubc.signing import Envelope, NoteSigner, Signature, encode_public_key, generate_signing_key
from ubc.signing.keys import key_id

_KEYS = [bytes(generate_signing_key().verify_key) for _ in range(6)]
_IDS = [key_id(k) for k in _KEYS]
LEDGER, OPERATOR = 0, 1  # _KEYS[0] is the ledger's, _KEYS[1] an operator's


def _replayer(current: list[bool], owners: list[int]) -> _MemoryReplayer:
    signer = NoteSigner("ubc.test", generate_signing_key())
    replayer = _MemoryReplayer(signer.verifier(), Report(), keep_rows=False)
    replayer.ctx = LedgerContext(
        origin="ubc.test",
        ledger_public_key=_KEYS[LEDGER],
        operator_keys={_IDS[OPERATOR]: _KEYS[OPERATOR]},
        enrollment="open",
        skew=timedelta(days=1),
        assets=("CU",),
    )
    replayer.ledger_keyid = _IDS[LEDGER]
    state = replayer.state
    # Keys 2.. belong to members (some rotated away); one of them also unknown.
    for i in range(2, len(_KEYS) - 1):
        handle = f"m{owners[i]}"
        state.members[handle] = MemberInfo(handle, "active", None)
        state.keys[_IDS[i]] = KeyInfo(_IDS[i], handle, _KEYS[i], current[i])
    return replayer


@settings(max_examples=500, deadline=None)
@given(
    current=st.lists(st.booleans(), min_size=len(_KEYS), max_size=len(_KEYS)),
    owners=st.lists(st.integers(0, 2), min_size=len(_KEYS), max_size=len(_KEYS)),
    signed=st.lists(st.integers(0, len(_KEYS) - 1), min_size=1, max_size=3, unique=True),
    verified_mask=st.lists(st.booleans(), min_size=3, max_size=3),
    ledger=st.sampled_from(["ubc.test", "ubc.other"]),
    introduces=st.sampled_from([None, "public_key", "new_public_key"]),
)
def test_shortcut_is_authenticate(
    current: list[bool],
    owners: list[int],
    signed: list[int],
    verified_mask: list[bool],
    ledger: str,
    introduces: str | None,
) -> None:
    replayer = _replayer(current, owners)
    fields: dict[str, Any] = {"ledger": ledger, "id": "x", "actor": "member:m0"}
    if introduces is not None:
        fields[introduces] = encode_public_key(_KEYS[signed[0]])
    payload = SimpleNamespace(**fields)
    sigs = tuple((_IDS[i], b"") for i in signed)
    verified = tuple(_IDS[i] for i, ok in zip(signed, verified_mask, strict=False) if ok)
    got = replayer._member_signer(payload, sigs, verified)
    if got is None:
        return
    assert ledger == "ubc.test"
    ctx = replayer.ctx
    assert ctx is not None
    envelope = Envelope("t", b"", tuple(Signature(k, s) for k, s in sigs))
    try:
        expected = authenticate(
            replayer.state,
            envelope,
            payload,  # type: ignore[arg-type]
            operator_keys=ctx.operator_keys,
            ledger_public_key=ctx.ledger_public_key,
            preverified=frozenset(verified),
        )
    except UbcError as error:  # pragma: no cover - the shortcut must not hide a refusal
        raise AssertionError(f"shortcut accepted what authenticate refuses: {error}") from None
    assert got == expected


def test_shortcut_takes_the_common_envelope() -> None:
    replayer = _replayer([True] * len(_KEYS), [0] * len(_KEYS))
    payload = SimpleNamespace(ledger="ubc.test", id="x", actor="member:m0")
    got = replayer._member_signer(payload, ((_IDS[2], b""),), (_IDS[2],))
    assert got is not None
    assert got.current == frozenset({"m0"})
    assert not got.operator
    # The ledger's and an operator's keys, and an unknown key, are left to authenticate.
    for i in (LEDGER, OPERATOR, len(_KEYS) - 1):
        assert replayer._member_signer(payload, ((_IDS[i], b""),), (_IDS[i],)) is None
