"""Spare holds (issue 14, item 5): a lone caller's next hold is placed while its call runs,
so that its next call does not wait for a transaction before the upstream is called.

Every call still runs under a durable hold of its own: the answer's ``x-request-id`` names
the usage entry that billed it, exactly once; a spare is released unbilled when unused;
and a member is never refused a call they can afford, nor billed more than they had."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from tests.test_gateway import Env, balance, serve_gateway
from ubc.db import make_engine, table
from ubc.gateway.service import SPARE_SECONDS, prompt_bound
from ubc.metering.models import UsageRecord

usage_t = table(UsageRecord)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("UBC_GATEWAY_SPARE_HOLDS", "1")  # off by default
    with serve_gateway(db_url, tmp_path, monkeypatch) as made:
        yield made


def settled(env: Env) -> None:
    """Once every spare hold is released (SPARE_SECONDS after the last call), every usage
    entry written and no hold open."""
    gateway = env.server.app.state.gateway
    deadline = time.monotonic() + 10 * SPARE_SECONDS
    while gateway._spares or gateway._refills:
        assert time.monotonic() < deadline, "spare holds not released"
        time.sleep(0.05)
    env.settled()


def usage_rows(env: Env) -> dict[str, tuple[int, int]]:
    """request_id -> (cost, held) of every journaled usage entry."""
    engine = make_engine(env.server.db_url, readonly=True)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(usage_t.c.request_id, usage_t.c.cost, usage_t.c.held)
            ).all()
    finally:
        engine.dispose()
    return {row.request_id: (int(row.cost), int(row.held)) for row in rows}


def lone_calls(sdk: openai.OpenAI, count: int) -> list[tuple[str, int]]:
    """``count`` calls one after the other: (x-request-id, cost) of each answer."""
    out = []
    for _ in range(count):
        raw = sdk.chat.completions.with_raw_response.create(
            model="chat-small", messages=MESSAGES, max_tokens=3
        )
        answer = raw.parse()
        assert answer.usage is not None
        out.append(
            (
                raw.headers["x-request-id"],
                answer.usage.prompt_tokens + 2 * answer.usage.completion_tokens,
            )
        )
    return out


def test_lone_calls_take_spare_holds_and_each_is_billed_once(env: Env) -> None:
    member, secret = env.member("alice", 10_000)
    sdk = env.sdk(secret)
    gateway = env.server.app.state.gateway
    calls = lone_calls(sdk, 8)
    # Calls after the first ran on holds placed ahead (each placed while the previous
    # call ran), under the spare's own id, which the request took.
    settled(env)  # the last spare is released unbilled after SPARE_SECONDS
    assert not gateway._spares
    rows = usage_rows(env)
    ids = [request_id for request_id, _ in calls]
    assert len(set(ids)) == len(ids)
    for request_id, cost in calls:
        assert rows[request_id][0] == cost  # its own usage entry, its own cost
    spare_releases = {r: v for r, v in rows.items() if r not in ids}
    assert all(cost == 0 for cost, _ in spare_releases.values())
    # The first two calls placed their own holds; the third on took spares; the last
    # spare, unused, was released by a usage entry of 0 tokens.
    assert gateway.spares_taken == 6
    assert len(spare_releases) == 1
    billed = sum(cost for _, cost in calls)
    after = balance(member)
    assert after["posted"] == 10_000 - billed
    assert after["pending_debits"] == 0


def test_a_spare_hold_unused_is_released_unbilled(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    [(_, cost)] = lone_calls(env.sdk(secret), 1)
    gateway = env.server.app.state.gateway
    settled(env)  # waits for the spare's release (SPARE_SECONDS) and its usage entry
    assert not gateway._spares
    assert not gateway._refills
    after = balance(member)
    assert after == {**after, "posted": 1000 - cost, "pending_debits": 0}
    assert SPARE_SECONDS <= 2


def test_lone_calls_are_never_refused_what_they_can_afford(env: Env) -> None:
    """Lone calls until the account runs out: the spare hold held beside each call never
    makes the last affordable call a 402, and nothing is billed beyond the deposit."""
    bound = prompt_bound({"messages": MESSAGES})
    need = bound + 2 * 1  # the smallest hold a call accepts: its prompt and one token
    deposit = 7 * (bound + 2 * 3) + need + 1
    member, secret = env.member("alice", deposit)
    sdk = env.sdk(secret)
    billed = 0
    refused: list[openai.APIStatusError] = []
    for _ in range(300):
        try:
            [(_, cost)] = lone_calls(sdk, 1)
        except openai.APIStatusError as exc:
            refused.append(exc)
            break
        billed += cost
    assert [e.status_code for e in refused] == [402]
    settled(env)
    after = balance(member)
    assert after["posted"] == deposit - billed >= 0
    assert after["posted"] < need  # refused only once it could not pay for one token
    assert after["pending_debits"] == 0


def test_bursts_after_lone_calls_never_overspend(env: Env) -> None:
    """Lone calls (spares placed), then 100 at once, twice: the account pays for exactly
    the calls that ran, never more than it had."""
    bound = prompt_bound({"messages": MESSAGES})
    per_call_hold = bound + 2 * 4
    deposit = 30 * per_call_hold
    member, secret = env.member("alice", deposit)
    sdk = env.sdk(secret)

    async def burst() -> list[Any]:
        client = openai.AsyncOpenAI(
            base_url=f"{env.server.url}/v1",
            api_key=secret,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=100), timeout=60
            ),
        )
        async with client:

            async def one() -> Any:
                try:
                    return await client.chat.completions.create(
                        model="chat-small", messages=MESSAGES, max_tokens=4
                    )
                except openai.APIStatusError as exc:
                    return exc

            return await asyncio.gather(*(one() for _ in range(100)))

    billed = sum(cost for _, cost in lone_calls(sdk, 3))
    for _ in range(2):
        results = asyncio.run(burst())
        ok = [r for r in results if not isinstance(r, openai.APIStatusError)]
        refused = [r for r in results if isinstance(r, openai.APIStatusError)]
        assert all(r.status_code == 402 for r in refused)
        billed += sum(r.usage.prompt_tokens + 2 * r.usage.completion_tokens for r in ok)
    settled(env)
    after = balance(member)
    assert after["posted"] == deposit - billed >= 0
    assert after["pending_debits"] == 0
