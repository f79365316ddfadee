"""A small ledger for the console's browser tests, written through the real API (signed
envelopes over HTTP): three members in two tiers, an epoch, a send, a donation to a
cause, an offer partly bought, a withdrawal asked for, and calls through the OpenAI SDK
on the local embedding model (so that the spend chart has something to show)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from ubc.client import UbcClient
from ubc.envelopes.payloads import format_timestamp
from ubc.signing import generate_signing_key

from .conftest import LiveServer

# One CU per token on the local embedding model, so that spending shows.
MODELS_TOML = """\
[models."all-minilm-l6-v2"]
backend = "local"
kind = "embeddings"
input_price = 1000
"""

XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


@dataclass
class Seeded:
    operator: UbcClient
    members: dict[str, UbcClient] = field(default_factory=dict)
    api_keys: dict[str, str] = field(default_factory=dict)
    offer_id: str = ""
    donation_seq: int = 0


def models_file(directory: Path) -> Path:
    path = directory / "models.toml"
    path.write_text(MODELS_TOML)
    return path


def seed(server: LiveServer, *, spend: bool = True) -> Seeded:
    operator = UbcClient(server.url, key=server.operator_key, token=server.operator_token)
    seeded = Seeded(operator)
    for handle, tier, name in (
        ("alice", "basic", "Alice"),
        ("bob", "basic", XSS),
        ("carol", "pro", "Carol"),
    ):
        member = UbcClient(server.url, key=generate_signing_key())
        member.register(handle, display_name=name)
        operator.admit(handle, tier)
        seeded.members[handle] = member
    # A member still waiting for admission.
    with UbcClient(server.url, key=generate_signing_key()) as dave:
        dave.register("dave", display_name="Dave")
    now = server.app.state.clock.now()
    operator.submit(
        operator.envelope(
            "epoch.open",
            actor="operator",
            epoch=1,
            asset="CU",
            allocations={"basic": 2000, "pro": 5000},
            carryover_cap=300,
            starts_at=format_timestamp(now),
            ends_at=format_timestamp(now + timedelta(days=30)),
        )
    )
    for handle, member in seeded.members.items():
        secret, _ = member.grant_api_key(f"{handle}'s laptop")
        member.token = secret
        seeded.api_keys[handle] = secret
    alice, bob, carol = (seeded.members[h] for h in ("alice", "bob", "carol"))
    alice.send("bob", 150, memo=XSS)
    operator.register_cause("open-research", "Open research", "Compute for research", ["carol"])
    donated = bob.donate("open-research", 400, memo="keep it open")
    seeded.donation_seq = int(donated["seq"])
    offer = carol.sell(1000, 500)
    seeded.offer_id = str(offer["id"])
    operator.deposit("bob", 300, asset="USD", external_ref="card-payment-0001")
    bob.buy(seeded.offer_id, 400)
    carol.withdraw(100, external_ref="bank-0001")
    if spend:
        import openai

        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=seeded.api_keys["alice"])
        with sdk:
            sdk.embeddings.create(model="all-minilm-l6-v2", input=["hello compute", "again"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(b["pending_debits"] == 0 for b in alice.balance()["balances"]):
                break
            time.sleep(0.05)
    return seeded


def close(seeded: Seeded) -> None:
    seeded.operator.close()
    for member in seeded.members.values():
        member.close()
