"""The metered call as one service call (:class:`ubc.gateway.service.Metered`): bills
once what was recorded, releases on any error or cancellation, a detached call is its
new owner's; and the grant checks the endpoint, the hold and the ``usage`` rule share."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from ubc.gateway.service import Gateway, GatewayError, Metered, usage_tokens
from ubc.metering.rules import grant_refusal, key_refusal


class FakeCall:
    def __init__(self) -> None:
        self.held = 100
        self.price = {"input": 1000, "output": 1000}
        self.request_id = "r"

    def headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}


class FakeGateway:
    def __init__(self) -> None:
        self.finished: list[tuple[int, int]] = []
        self.settled = False

    async def begin(self, *_: Any, **__: Any) -> FakeCall:
        return FakeCall()

    def finish(self, call: FakeCall, input_tokens: int, output_tokens: int) -> int:
        if not self.settled:  # as Gateway.finish: once per call
            self.settled = True
            self.finished.append((input_tokens, output_tokens))
        return 0


def metered(fake: FakeGateway) -> Metered:
    return Metered(cast(Gateway, fake), cast(Any, None), cast(Any, None), 10, 20, None)


def test_bills_what_was_recorded_once_on_exit() -> None:
    fake = FakeGateway()

    async def run() -> None:
        async with metered(fake) as m:
            m.bill(3, 4)
            m.bill(5, 6)  # the last record counts

    asyncio.run(run())
    assert fake.finished == [(5, 6)]


@pytest.mark.parametrize("error", [GatewayError(402, "no"), RuntimeError("x")])
def test_releases_on_an_error_even_after_recording(error: Exception) -> None:
    fake = FakeGateway()

    async def run() -> None:
        async with metered(fake) as m:
            m.bill(3, 4)
            raise error

    with pytest.raises(type(error)):
        asyncio.run(run())
    assert fake.finished == [(0, 0)]


def test_releases_on_cancellation() -> None:
    fake = FakeGateway()
    entered = asyncio.Event()

    async def call() -> None:
        async with metered(fake):
            entered.set()
            await asyncio.sleep(10)

    async def run() -> None:
        task = asyncio.create_task(call())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert fake.finished == [(0, 0)]


def test_a_detached_call_is_settled_by_its_new_owner() -> None:
    fake = FakeGateway()

    async def run() -> Metered:
        async with metered(fake) as m:
            return m.detach()

    handle = asyncio.run(run())
    assert fake.finished == []
    handle.usage_from({"prompt_tokens": 7, "completion_tokens": 2}, 100, 9)
    handle.settle()
    handle.settle()
    assert fake.finished == [(7, 2)]


def test_nothing_is_billed_when_the_hold_was_refused() -> None:
    fake = FakeGateway()

    async def refuse(*_: Any, **__: Any) -> FakeCall:
        raise GatewayError(402, "no")

    fake.begin = refuse  # type: ignore[method-assign]

    async def run() -> None:
        async with metered(fake):
            pass

    with pytest.raises(GatewayError):
        asyncio.run(run())
    assert fake.finished == []


def test_usage_tokens_reported_or_estimated() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 5}
    assert usage_tokens(usage, 400, 3) == (11, 5)
    assert usage_tokens(usage, 400, completion=False) == (11, 0)
    assert usage_tokens(None, 400, 3) == (100, 3)
    assert usage_tokens({"completion_tokens": 5}, 401, 3) == (101, 3)
    answer = {"choices": [{"message": {"content": "abcdefgh"}}, {"message": {}}]}
    assert usage_tokens(None, 400, answer=answer) == (100, 2)


def test_the_shared_grant_checks() -> None:
    assert grant_refusal(["models"], None, "m") is None
    assert grant_refusal(["journal"], None, None) == "scope"
    assert grant_refusal(frozenset({"models"}), frozenset({"a"}), "b") == "model"
    assert grant_refusal(["models"], ["a"], None) is None
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert key_refusal(False, None, now) is None
    assert key_refusal(True, None, now) == "revoked"
    assert key_refusal(False, now, now) == "expired"
    assert key_refusal(False, now + timedelta(seconds=1), now) is None
