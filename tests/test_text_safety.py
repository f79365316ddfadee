"""Human text (memos, display names, labels, reasons, external references, causes) may
not hold bidirectional controls, invisible or control characters (issue 12): refused with
400 naming the field, at submission only, so that a journal accepted before still verifies.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from ubc.audit.source import from_database
from ubc.audit.verify import verify_journal
from ubc.client import UbcApiError, UbcClient
from ubc.envelopes import service
from ubc.envelopes.payloads import check_text, validate_payload
from ubc.errors import InvalidPayload
from ubc.signing import generate_signing_key

KEY = "A" * 43 + "="
HASH = "ab" * 32

BIDI = ["\u202e", "\u202a", "\u202d", "\u2066", "\u2069", "\u200e", "\u200f", "\u061c"]
INVISIBLE = [
    "\u200b",  # zero-width space
    "\u200c",  # zero-width non-joiner
    "\u200d",  # zero-width joiner
    "\u2060",  # word joiner
    "\u2064",  # invisible plus
    "\ufeff",  # byte order mark
    "\u180e",  # Mongolian vowel separator
    "\u00ad",  # soft hyphen
    "\U000e0041",  # tag latin capital A
    "\u3164",  # Hangul filler
    "\u034f",  # combining grapheme joiner
]
CONTROL = ["\x07", "\x1b", "\r", "\n", "\t", "\x7f", "\x85", "\u2028", "\u2029"]
FINE = ["café", "東京の雨", "مرحبا بالعالم", "שלום", "emoji 🎉❤️", "a—b «c» d…", "x" * 256]


def payload(type_: str, **fields: Any) -> Any:
    body = {
        "ledger": "test.ubc/ledger",
        "id": str(uuid.uuid4()),
        "created_at": "2026-01-31T12:00:00Z",
        **fields,
    }
    return validate_payload(type_, body)


def transfer(memo: str) -> Any:
    return payload(
        "transfer",
        actor="member:alice",
        **{"from": "member:alice"},
        to="member:bob",
        asset="CU",
        amount=1,
        memo=memo,
    )


# Every human text field, with a payload that carries ``text`` in it.
FIELDS: dict[str, Any] = {
    "memo": transfer,
    "display_name": lambda text: payload(
        "member.register", actor="member:alice", handle="alice", public_key=KEY, display_name=text
    ),
    "label": lambda text: payload(
        "apikey.grant",
        actor="member:alice",
        account="member:alice",
        key_hash=HASH,
        label=text,
        scopes=["read"],
    ),
    "models": lambda text: payload(
        "apikey.grant",
        actor="member:alice",
        account="member:alice",
        key_hash=HASH,
        label="ok",
        scopes=["models"],
        models=["gpt-x", text],
    ),
    "reason": lambda text: payload(
        "member.update", actor="operator", handle="alice", status="suspended", reason=text
    ),
    "external_ref": lambda text: payload(
        "deposit", actor="operator", to="member:alice", asset="CU", amount=1, external_ref=text
    ),
    "name": lambda text: payload(
        "cause.register",
        actor="operator",
        slug="open",
        name=text,
        description="d",
        stewards=["alice"],
    ),
    "description": lambda text: payload(
        "cause.update",
        actor="operator",
        slug="open",
        name="Open",
        description=text,
        stewards=["alice"],
    ),
}


@pytest.mark.parametrize(
    ("char", "kind"),
    [(c, "bidirectional control") for c in BIDI]
    + [(c, "invisible character") for c in INVISIBLE]
    + [(c, "control character") for c in CONTROL[:-2]]
    + [(c, "line or paragraph separator") for c in CONTROL[-2:]],
)
def test_each_class_of_character_is_refused_in_a_memo(char: str, kind: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        check_text(transfer(f"pay me{char}back"))
    assert kind in info.value.message
    assert info.value.detail == {
        "field": "memo",
        "character": f"U+{ord(char):04X}",
        "position": 6,
    }
    assert info.value.status_code == 400


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\x1b"])
def test_every_human_text_field_is_checked(field: str, char: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        check_text(FIELDS[field](f"ok{char}"))
    assert info.value.detail["field"] == field
    assert repr(field) in info.value.message


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("text", FINE)
def test_ordinary_text_of_any_script_is_accepted(field: str, text: str) -> None:
    limit = {"display_name": 80, "label": 64, "name": 80, "external_ref": 128, "models": 128}
    check_text(FIELDS[field](text[: limit.get(field, 256)]))


def test_a_cause_description_may_hold_lines_and_tabs_and_nothing_else() -> None:
    check_text(FIELDS["description"]("Line one.\n\n\tLine two."))
    with pytest.raises(InvalidPayload):
        check_text(FIELDS["description"]("Line one.\r\nLine two."))
    with pytest.raises(InvalidPayload):
        check_text(FIELDS["name"]("Line one.\nLine two."))


# --- over HTTP ------------------------------------------------------------------------------

_open: list[UbcClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def people(server: LiveServer, *handles: str) -> dict[str, UbcClient]:
    operator = UbcClient(server.url, key=server.operator_key, token=server.operator_token)
    _open.append(operator)
    found = {"operator": operator}
    for handle in handles:
        member = UbcClient(server.url, key=generate_signing_key(), handle=handle)
        _open.append(member)
        member.register()
        operator.admit(handle, "basic")
        operator.deposit(handle, 100, "CU", external_ref=f"{handle}-cu")
        operator.deposit(handle, 100, "USD", external_ref=f"{handle}-usd")
        found[handle] = member
    return found


def journal_size(client: UbcClient) -> int:
    return int(client.checkpoint().split("\n")[1])


def refused(call: Any, field: str) -> None:
    with pytest.raises(UbcApiError) as info:
        call()
    assert info.value.status == 400
    assert info.value.type == "invalid_payload"
    assert info.value.detail["field"] == field


def test_text_is_checked_on_every_way_in(live_server: LiveServer) -> None:
    p = people(live_server, "alice", "bob")
    alice, operator = p["alice"], p["operator"]
    size = journal_size(operator)
    spoof = "invoice \u202egnp.exe"
    refused(lambda: alice.send("bob", 1, memo=spoof), "memo")
    carol = UbcClient(live_server.url, key=generate_signing_key(), handle="carol")
    _open.append(carol)
    refused(lambda: carol.register(display_name="al\u200bice"), "display_name")
    refused(lambda: alice.grant_api_key("k\x1b[31m", scopes=["read"]), "label")
    refused(lambda: operator.register_cause("open", "Open\u2066", "papers", ["alice"]), "name")
    refused(lambda: operator.update_member("bob", status="suspended", reason="\ufeff"), "reason")
    refused(lambda: operator.deposit("bob", 1, external_ref="ref\u200d1"), "external_ref")
    # A withdrawal left for the operator is checked when it is left, not only when approved.
    refused(lambda: alice.withdraw(1, external_ref="pay\u00adout", asset="USD"), "external_ref")
    # A batch answers per item.
    [result] = operator.submit_batch(
        [
            alice.envelope(
                "transfer",
                from_=alice.address,
                to="member:bob",
                asset="CU",
                amount=1,
                memo="\u200f",
            )
        ]
    )
    assert result.status == 400
    assert journal_size(operator) == size  # nothing was accepted
    # Ordinary text, in any script, with a multi-line description, is accepted.
    alice.send("bob", 1, memo="merci — 谢谢 — شكرا 🎉")
    operator.register_cause("open", "Open research", "Papers.\n\n\tAnd data.", ["alice"])
    assert journal_size(operator) == size + 2


def test_a_journal_accepted_before_the_rule_still_verifies(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = people(live_server, "alice", "bob")
    alice = p["alice"]
    old = alice.envelope(
        "transfer", from_=alice.address, to="member:bob", asset="CU", amount=3, memo="a\u202eb"
    )
    # A ledger from before the rule accepted it...
    with monkeypatch.context() as before:
        before.setattr(service, "check_text", lambda _payload: None)
        first = httpx.post(live_server.url + "/api/envelopes", json=old)
    assert first.status_code == 201, first.text
    # ...now such text is refused, but the same envelope again is a replay of what was
    # accepted, and the auditor replays the journal that holds it without a finding.
    new = alice.envelope(
        "transfer", from_=alice.address, to="member:bob", asset="CU", amount=3, memo="a\u202eb"
    )
    assert httpx.post(live_server.url + "/api/envelopes", json=new).status_code == 400
    again = httpx.post(live_server.url + "/api/envelopes", json=old)
    assert again.status_code == 200
    assert again.json() == first.json()
    vkey = str(p["operator"].ledger_info()["vkey"])
    report = verify_journal(from_database(live_server.db_url), vkey)
    assert report.ok, report.findings
