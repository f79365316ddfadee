"""The write path over HTTP: batches, co-signatures, group commit, gapless journal."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import LiveServer
from ubc.client import UbcApiError, UbcClient
from ubc.signing import generate_signing_key

_open: list[UbcClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def make_client(server: LiveServer, **kwargs: Any) -> UbcClient:
    made = UbcClient(server.url, token=server.operator_token, **kwargs)
    _open.append(made)
    return made


def world(server: LiveServer, *handles: str, funds: int = 1000) -> dict[str, UbcClient]:
    operator = make_client(server, key=server.operator_key)
    members = {}
    for handle in handles:
        member = make_client(server, key=generate_signing_key(), handle=handle)
        member.register()
        operator.admit(handle, "basic")
        operator.deposit(handle, funds, external_ref=f"fund-{handle}")
        members[handle] = member
    members["operator"] = operator
    return members


def journal_size(client: UbcClient) -> int:
    return int(client.checkpoint().split("\n")[1])


def test_withdrawal_signed_by_owner_only_can_be_cosigned_later(live_server: LiveServer) -> None:
    w = world(live_server, "alice")
    envelope = w["alice"].withdrawal_envelope(40, external_ref="bank-1")
    with pytest.raises(UbcApiError) as info:
        w["alice"].submit(envelope)
    assert info.value.status == 403
    assert info.value.type == "missing_signature"
    receipt = w["operator"].submit(w["operator"].cosign(envelope))
    assert receipt["effects"][0]["amount"] == 40
    assert w["alice"].balance("member:alice")["balances"][0]["posted"] == 960


def test_register_admit_and_spend_in_one_batch(live_server: LiveServer) -> None:
    w = world(live_server, "alice")
    carol = make_client(live_server, key=generate_signing_key(), handle="carol")
    operator = w["operator"]
    batch = [
        carol.envelope("member.register", handle="carol", public_key=_pub(carol)),
        operator.envelope("member.admit", handle="carol", tier="basic"),
        w["alice"].envelope(
            "transfer", from_="member:alice", to="member:carol", asset="CU", amount=10
        ),
        carol.envelope("transfer", from_="member:carol", to="member:alice", asset="CU", amount=4),
    ]
    results = operator.submit_batch(batch, atomic=True)
    assert [r.status for r in results] == [201, 201, 201, 201]
    seqs = [r.receipt["seq"] for r in results if r.receipt]
    assert seqs == sorted(seqs)
    assert seqs == list(range(seqs[0], seqs[0] + 4))
    assert carol.balance("member:carol")["balances"][0]["posted"] == 6


def _pub(client: UbcClient) -> str:
    import base64

    assert client.key is not None
    return base64.b64encode(bytes(client.key.verify_key)).decode()


def test_concurrent_writers_get_distinct_gapless_seqs(live_server: LiveServer) -> None:
    w = world(live_server, "alice", "bob", funds=10_000)
    before = journal_size(w["operator"])

    def send(i: int) -> int:
        sender, receiver = ("alice", "bob") if i % 2 else ("bob", "alice")
        return int(w[sender].send(receiver, 1 + i % 3)["seq"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        seqs = list(pool.map(send, range(200)))
    assert sorted(seqs) == list(range(before, before + 200))
    assert journal_size(w["operator"]) == before + 200
    total = sum(
        b["posted"]
        for h in ("alice", "bob")
        for b in w[h].balance(f"member:{h}")["balances"]
        if b["asset"] == "CU"
    )
    assert total == 20_000


def test_refusals_consume_no_seq(live_server: LiveServer) -> None:
    w = world(live_server, "alice", "bob")
    before = journal_size(w["operator"])
    with pytest.raises(UbcApiError):
        w["alice"].send("bob", 10**6)
    with pytest.raises(UbcApiError):
        w["bob"].submit(
            w["bob"].envelope(
                "transfer", from_="member:alice", to="member:bob", asset="CU", amount=1
            )
        )
    receipt = w["alice"].send("bob", 1)
    assert receipt["seq"] == before


def test_a_refused_registration_leaves_no_member_behind(live_server: LiveServer) -> None:
    # '_ab' once passed the payload's handle pattern and was refused by the ledger's
    # address rule after the member's rows were written: they stayed, unjournaled.
    key = generate_signing_key()
    bad = make_client(live_server, key=key, handle="_ab")
    with pytest.raises(UbcApiError) as info:
        bad.register()
    assert info.value.status == 400
    size = journal_size(bad)
    good = make_client(live_server, key=key, handle="abc")
    good.register()  # the same key is free: nothing of '_ab' was kept
    assert journal_size(good) == size + 1
    with pytest.raises(UbcApiError) as missing:
        make_client(live_server).member("_ab")
    assert missing.value.status in (400, 404)
