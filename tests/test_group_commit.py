"""The group-commit writer's group boundaries (``GroupCommitWriter._fill``), and a group of
concurrent single envelopes holding failures and repeats on both engines."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

from tests.conftest import LiveServer
from tests.test_envelopes import journal_size, world
from ubc.client import UbcApiError
from ubc.envelopes.writer import PRECHECK_APART, GroupCommitWriter


class _Recording(GroupCommitWriter):
    """The real queue and grouping; each group's apply records its size (no database)."""

    def __init__(self, linger: float) -> None:
        super().__init__(cast(Any, None), cast(Any, None), linger=linger)
        self.groups: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def _precheck(self, raws: Sequence[object]) -> list[Any]:
        return list(raws)

    def _apply(self, raws: list[object], atomic: bool) -> list[Any]:
        self.groups.append(len(raws))
        self.release.wait(10)
        return [None] * len(raws)


async def _until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")


def test_a_group_waits_for_as_many_envelopes_as_the_group_before() -> None:
    async def main() -> tuple[list[int], float]:
        writer = _Recording(linger=30.0)  # only the count can end the wait in time
        writer.start()
        writer.release.clear()
        first = asyncio.ensure_future(writer.submit(["a"]))
        await _until(lambda: writer.groups == [1])
        # Four more arrive while the first group commits: the next group takes them all.
        more = [asyncio.ensure_future(writer.submit([f"b{i}"])) for i in range(4)]
        await asyncio.sleep(0.01)
        writer.release.set()
        await asyncio.gather(first, *more)
        assert writer.groups == [1, 4]
        # Now they come back one at a time: one group of four, not a group of one first.
        started = time.monotonic()
        later = []
        for i in range(4):
            later.append(asyncio.ensure_future(writer.submit([f"c{i}"])))
            await asyncio.sleep(0.02)
        await asyncio.gather(*later)
        elapsed = time.monotonic() - started
        await writer.stop()
        return writer.groups, elapsed

    groups, elapsed = asyncio.run(main())
    assert groups == [1, 4, 4]
    assert elapsed < 5


def test_a_group_waits_at_most_the_linger() -> None:
    async def main() -> tuple[list[int], float]:
        writer = _Recording(linger=0.2)
        writer.start()
        await asyncio.gather(*(writer.submit([f"a{i}"]) for i in range(3)))
        assert writer.groups[-1] == 3
        started = time.monotonic()
        await writer.submit(["alone"])  # the two others never come
        elapsed = time.monotonic() - started
        await writer.stop()
        return writer.groups, elapsed

    groups, elapsed = asyncio.run(main())
    assert groups[-1] == 1
    assert 0.15 <= elapsed < 5


def test_no_wait_when_idle_or_for_a_large_request() -> None:
    async def main() -> tuple[list[int], float, float]:
        writer = _Recording(linger=30.0)
        writer.start()
        # One caller at a time: each group had one envelope, so the next waits for none.
        started = time.monotonic()
        for i in range(5):
            await writer.submit([f"a{i}"])
        alone = time.monotonic() - started
        # After a group of 40, a large request (prechecked apart) is a group of its own.
        await writer.submit([f"b{i}" for i in range(40)])
        started = time.monotonic()
        await writer.submit([f"c{i}" for i in range(PRECHECK_APART)])
        large = time.monotonic() - started
        await writer.stop()
        return writer.groups, alone, large

    groups, alone, large = asyncio.run(main())
    assert groups == [1, 1, 1, 1, 1, 40, PRECHECK_APART]
    assert alone < 5
    assert large < 5


def test_concurrent_single_envelopes_with_refusals_and_repeats(live_server: LiveServer) -> None:
    """Concurrent callers share group commits: a refused transfer and the repeats of an
    accepted one change nothing for the others, on both engines."""
    w = world(live_server, "alice", "bob", funds=100)
    before = journal_size(w["operator"])
    good = [
        w["alice" if i % 2 else "bob"].envelope(
            "transfer",
            from_="member:alice" if i % 2 else "member:bob",
            to="member:bob" if i % 2 else "member:alice",
            asset="CU",
            amount=1,
        )
        for i in range(20)
    ]
    overdraft = w["alice"].envelope(
        "transfer", from_="member:alice", to="member:bob", asset="CU", amount=10**6
    )
    # The first good envelope three times (repeats), the overdraft twice.
    sends = [*good, good[0], good[0], overdraft, overdraft]

    def send(envelope: Any) -> tuple[str, int | None]:
        try:
            receipt = w["operator"].submit(envelope)
        except UbcApiError as error:
            return ("refused", error.status)
        return ("accepted", int(receipt["seq"]))

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(send, sends))
    accepted = [seq for kind, seq in results[:20] if kind == "accepted"]
    assert sorted(cast(list[int], accepted)) == list(range(before, before + 20))
    assert results[20] == results[21] == results[0]
    assert [kind for kind, _ in results[22:]] == ["refused", "refused"]
    assert results[22] == results[23]
    assert journal_size(w["operator"]) == before + 20
    total = sum(
        b["posted"]
        for h in ("alice", "bob")
        for b in w[h].balance(f"member:{h}")["balances"]
        if b["asset"] == "CU"
    )
    assert total == 200


def test_stopping_while_a_group_waits_applies_nothing_and_cancels_its_caller() -> None:
    async def main() -> tuple[list[int], bool]:
        writer = _Recording(linger=30.0)
        writer.start()
        await asyncio.gather(*(writer.submit([f"a{i}"]) for i in range(3)))
        waiting = asyncio.ensure_future(writer.submit(["alone"]))
        await asyncio.sleep(0.05)  # taken, and waiting for two more
        await writer.stop()
        await asyncio.sleep(0)
        return writer.groups, waiting.cancelled()

    groups, cancelled = asyncio.run(main())
    assert sum(groups) == 3  # the one waiting was never applied
    assert cancelled
