"""The Python client against a real server: every payload type, errors, key rotation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

from tests.conftest import LiveServer
from ubc.client import UbcApiError, UbcClient, api_key_hash, to_address
from ubc.signing import Envelope, generate_signing_key, parse_payload


@pytest.fixture
def operator(live_server: LiveServer) -> Iterator[UbcClient]:
    with UbcClient(
        live_server.url, key=live_server.operator_key, token=live_server.operator_token
    ) as client:
        yield client


class Members:
    """Makes clients on the live server, and closes them all at the end of the test."""

    def __init__(self, server: LiveServer, operator: UbcClient) -> None:
        self.server = server
        self.operator = operator
        self.clients: list[UbcClient] = []

    def client(self, **kwargs: Any) -> UbcClient:
        client = UbcClient(self.server.url, **kwargs)
        self.clients.append(client)
        return client

    def join(self, handle: str, *, cu: int = 0) -> UbcClient:
        """A registered, admitted member holding ``cu`` CU, reading with its own API key."""
        client = self.client(key=generate_signing_key())
        client.register(handle)
        self.operator.admit(handle, "basic")
        if cu:
            self.operator.deposit(handle, cu, external_ref=f"seed-{handle}")
        client.token, _ = client.grant_api_key("test")
        return client


@pytest.fixture
def members(live_server: LiveServer, operator: UbcClient) -> Iterator[Members]:
    made = Members(live_server, operator)
    yield made
    for client in made.clients:
        client.close()


def available(client: UbcClient, address: str, asset: str = "CU") -> int:
    [balance] = [b for b in client.balance(address)["balances"] if b["asset"] == asset]
    return balance["available"]


def payload_of(envelope: dict[str, object]) -> dict[str, object]:
    return parse_payload(Envelope.from_json(envelope).payload)


def test_every_payload_type_round_trips(members: Members, operator: UbcClient) -> None:
    alice = members.client(key=generate_signing_key())
    receipt = alice.register("alice", display_name="Alice")
    assert receipt["type"] == "member.register"
    assert alice.handle == "alice"
    assert alice.origin == "test.ubc/ledger"
    assert operator.member("alice")["status"] == "pending"

    assert operator.admit("alice", "basic")["type"] == "member.admit"
    assert operator.update_member("alice", tier="plus", reason="promoted")["effects"] == []
    member = operator.member("alice")
    assert (member["status"], member["tier"], member["display_name"]) == ("active", "plus", "Alice")

    deposit = operator.deposit("member:alice", 100, external_ref="wire-1")
    assert deposit["type"] == "deposit"
    assert deposit["effects"][0]["credit"] == "member:alice"
    assert deposit["effects"][0]["amount"] == 100

    secret, grant = alice.grant_api_key(
        "laptop",
        spend_cap_per_epoch=50,
        models=["small"],
        expires_at=datetime.now(UTC) + timedelta(days=1),
        rpm=60,
        tpm=10_000,
    )
    assert grant["type"] == "apikey.grant"
    assert secret.startswith("ubc_sk_")
    alice.token = secret
    assert alice.member()["handle"] == "alice"

    bob = members.join("bob")
    sent = alice.send("bob", 30, memo="thanks")
    assert sent["effects"][0]["debit"] == "member:alice"
    assert sent["effects"][0]["credit"] == "member:bob"
    alice.send("member:bob", 5)
    assert available(alice, "member:alice") == 65
    assert available(bob, "member:bob") == 35

    legs = operator.transfer(sent["id"])["transfers"]
    assert [(t["debit"], t["credit"], t["amount"], t["memo"]) for t in legs] == [
        ("member:alice", "member:bob", 30, "thanks")
    ]
    items = list(alice.iter_history(page_size=1))
    assert [i["amount"] for i in items] == [-5, -30, 100]
    assert [i["balance_after"] for i in items] == [65, 70, 100]

    with pytest.raises(UbcApiError) as refused:
        alice.submit(alice.withdrawal_envelope(20, external_ref="payout-0"))
    assert refused.value.status == 403
    owner_signed = alice.withdrawal_envelope(20, external_ref="payout-1")
    assert payload_of(owner_signed)["from"] == "member:alice"
    withdrawal = operator.submit(operator.cosign(owner_signed))
    assert withdrawal["type"] == "withdrawal"
    assert available(operator, "member:alice") == 45

    assert alice.revoke_api_key(api_key_hash(secret))["type"] == "apikey.revoke"
    with pytest.raises(UbcApiError) as revoked:
        alice.balance()
    assert revoked.value.status == 401

    new_key = generate_signing_key()
    assert alice.rotate_key(new_key)["type"] == "key.rotate"
    assert alice.key is new_key
    alice.send("bob", 1)
    keys = operator.member("alice")["keys"]
    assert [k["current"] for k in keys] == [False, True]

    operator.update_member("bob", status="suspended", reason="audit")
    assert operator.member("bob")["status"] == "suspended"
    with pytest.raises(UbcApiError) as suspended:
        bob.send("alice", 1)
    assert suspended.value.status == 403
    operator.update_member("bob", status="active")
    bob.send("alice", 1)

    # A donation is a transfer to cause:<slug>; this ledger has no such cause.
    with pytest.raises(UbcApiError) as no_cause:
        alice.donate("malaria-research", 1)
    assert no_cause.value.status == 404
    assert no_cause.value.detail["address"] == "cause:malaria-research"

    checkpoint = alice.checkpoint()
    assert checkpoint.startswith("test.ubc/ledger\n")
    info = alice.ledger_info()
    assert info["enrollment"] == "invite"
    assert info["origin"] == "test.ubc/ledger"


def test_errors_raise_ubc_api_error_with_the_status(members: Members, operator: UbcClient) -> None:
    alice = members.join("alice", cu=10)
    bob = members.join("bob")

    cases: list[tuple[int, str, Callable[[], object]]] = [
        (400, "invalid_payload", lambda: alice.send("bob", 0)),
        (409, "insufficient_funds", lambda: alice.send("bob", 11)),
        (404, "account_not_found", lambda: alice.send("nobody", 1)),
        (403, "forbidden", lambda: alice.admit("bob", "basic")),
        (403, "forbidden", lambda: bob.balance("alice")),
        (404, "not_found", lambda: operator.member("nobody")),
        (409, "state_conflict", lambda: operator.admit("bob", "basic")),
        (404, "transfer_not_found", lambda: operator.transfer("no-such-id")),
    ]
    for status, kind, call in cases:
        with pytest.raises(UbcApiError) as caught:
            call()
        assert (caught.value.status, caught.value.type) == (status, kind), caught.value
        assert caught.value.message

    with pytest.raises(UbcApiError) as short:
        alice.send("bob", 11)
    assert short.value.detail["shortfall"] == 1

    stranger = members.client(key=generate_signing_key(), handle="alice")
    with pytest.raises(UbcApiError) as unknown:
        stranger.send("bob", 1)
    assert unknown.value.status == 401

    anonymous = members.client(origin="test.ubc/ledger")
    with pytest.raises(UbcApiError) as no_token:
        anonymous.balance("alice")
    assert no_token.value.status == 401

    elsewhere = members.client(origin="other/ledger", key=alice.key, handle="alice")
    with pytest.raises(UbcApiError) as wrong_ledger:
        elsewhere.send("bob", 1)
    assert (wrong_ledger.value.status, wrong_ledger.value.type) == (400, "invalid_payload")

    pending = members.client(key=generate_signing_key())
    pending.register("carol")
    with pytest.raises(UbcApiError) as not_admitted:
        pending.send("bob", 1)
    assert not_admitted.value.status == 403
    assert available(operator, "member:alice") == 10


def test_replay_answers_the_original_receipt(members: Members, operator: UbcClient) -> None:
    alice = members.join("alice", cu=10)
    members.join("bob")
    envelope = alice.envelope(
        "transfer", from_="member:alice", to="member:bob", asset="CU", amount=3
    )
    first = alice.submit(envelope)
    again = alice.submit(envelope)
    assert again["seq"] == first["seq"]
    assert again["id"] == first["id"]
    assert available(operator, "member:alice") == 7


def test_key_rotation_refuses_the_old_key(members: Members, operator: UbcClient) -> None:
    alice = members.join("alice", cu=10)
    members.join("bob")
    old_key = alice.key
    assert old_key is not None
    alice.rotate_key(generate_signing_key())
    old = members.client(key=old_key, handle="alice")
    with pytest.raises(UbcApiError) as refused:
        old.send("bob", 1)
    assert refused.value.status == 403
    assert "rotated" in refused.value.message
    with pytest.raises(UbcApiError) as again:
        old.rotate_key(generate_signing_key())
    assert again.value.status == 403
    alice.send("bob", 4)
    assert available(operator, "member:alice") == 6


def test_batches_atomic_and_not(members: Members, operator: UbcClient) -> None:
    alice = members.join("alice", cu=10)
    members.join("bob")

    def transfer(amount: int) -> dict[str, object]:
        return alice.envelope(
            "transfer", from_="member:alice", to="member:bob", asset="CU", amount=amount
        )

    with pytest.raises(UbcApiError) as failed:
        alice.submit_batch([transfer(1), transfer(100)], atomic=True)
    assert (failed.value.status, failed.value.detail["index"]) == (409, 1)
    assert available(operator, "member:alice") == 10

    results = alice.submit_batch([transfer(2), transfer(100), transfer(3)])
    assert [r.status for r in results] == [201, 409, 201]
    assert [r.ok for r in results] == [True, False, True]
    assert results[0].receipt is not None
    assert results[0].receipt["type"] == "transfer"
    assert results[1].error is not None
    assert results[1].error.type == "insufficient_funds"
    assert available(operator, "member:alice") == 5


def test_operator_envelopes_need_the_operator_key(members: Members) -> None:
    impostor = members.client(key=generate_signing_key())
    with pytest.raises(UbcApiError) as refused:
        impostor.deposit("alice", 5, external_ref="x")
    assert refused.value.status == 401


# --- without a server: MockTransport ---------------------------------------------------------


def test_origin_is_fetched_once_and_envelopes_are_filled_in() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/api/ledger":
            return httpx.Response(200, json={"origin": "mock/ledger"})
        body = json.loads(request.content)
        return httpx.Response(
            201, json={"seq": 1, "id": "x", "type": "transfer", "effects": [], "echo": body}
        )

    key = SigningKey.generate()
    with UbcClient(
        "http://ledger.test", key=key, handle="alice", transport=httpx.MockTransport(handler)
    ) as client:
        first = client.envelope("transfer", from_="member:alice", to="member:bob", amount=1)
        second = client.envelope("transfer", memo=None, amount=2)
    assert seen == ["/api/ledger"]
    payload = payload_of(first)
    assert payload["ledger"] == "mock/ledger"
    assert payload["actor"] == "member:alice"
    assert payload["from"] == "member:alice"
    assert "memo" not in payload_of(second)
    assert payload["id"] != payload_of(second)["id"]
    assert first["payloadType"] == "application/vnd.ubc.transfer+json"


def test_transport_errors_are_retried_and_odd_answers_become_api_errors() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if request.url.path == "/api/envelopes" and calls == 1:
            raise httpx.ConnectError("connection reset", request=request)
        if request.url.path == "/api/envelopes":
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(404, json={"detail": "Not Found"})

    with UbcClient(
        "http://ledger.test",
        origin="mock/ledger",
        key=SigningKey.generate(),
        transport=httpx.MockTransport(handler),
    ) as client:
        with pytest.raises(UbcApiError) as gateway:
            client.deposit("alice", 1, external_ref="r")
        assert (gateway.value.status, gateway.value.message) == (502, "bad gateway")
        assert calls == 2
        with pytest.raises(UbcApiError) as missing:
            client.checkpoint()
        assert (missing.value.status, missing.value.message) == (404, "Not Found")


def test_local_misuse_is_a_value_error() -> None:
    with UbcClient("http://ledger.test", origin="mock/ledger") as client:
        with pytest.raises(ValueError, match="no signing key"):
            client.admit("alice", "basic")
        with pytest.raises(ValueError, match="no member handle"):
            client.balance()
    assert to_address("alice") == "member:alice"
    assert to_address("cause:x") == "cause:x"
