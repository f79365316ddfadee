"""Does an epoch stop the ledger? Transfers while 1,000,000 members are opened and closed.

Issue 14, item 1: opening and closing an epoch for a million members must run in bounded
steps, each holding the journal's lock for at most a few hundred milliseconds, while
transfers and model calls go on. This measures both sides in one run, on one database:

- **the steps**: the epoch is opened and closed exactly as ``bench_epoch`` does it (the
  write path's envelopes, then the server background task's steps, each in its own unit
  of work), and each step's time is the time it held its lock: the open's and the
  close's entries and every ``epoch.expire`` step hold the journal's lock; a fix step holds
  the epoch's row; an allocation batch its members' accounts.
- **the probe**: meanwhile a thread signs and submits transfers between 20 members of its
  own (registered through the write path, funded in USD: their accounts are in no step's
  range, so a transfer waits only for the journal), one envelope per unit of work, back
  to back. Every transfer must be accepted; its latency is the time from submit to commit.
  The longest latency is how long the ledger stood still for a writer.
- **the comparison**: then the same population is reset and the same open and close run
  **whole** (``CHUNK`` and ``STEP`` set above the member count: one transaction each under
  the journal's lock, as a close always ran before this change) with the same probe.

After each variant the balances are checked as in ``bench_epoch`` (the probe members left
out). ``--members`` defaults to 1,000,000 on PostgreSQL.

    python scripts/bench_epoch_stall.py --members 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_epoch import (  # noqa: E402  (a sibling script)
    DEFAULT_POSTGRES_URL,
    ORIGIN,
    PROBE_PREFIX,
    Ledger,
    RunTimes,
    check,
    cpu_model,
    envelope,
    fresh_ledger,
    loadavg,
    log,
    populate,
    reset,
    service_close,
    service_open,
)

from ubc.db import run_unit_of_work  # noqa: E402
from ubc.envelopes.payloads import format_timestamp, validate_payload  # noqa: E402
from ubc.envelopes.service import Accepted, sign_payload, submit  # noqa: E402
from ubc.epochs import service as epochs  # noqa: E402
from ubc.signing import encode_public_key, generate_signing_key  # noqa: E402

PROBES = 20
FUNDS = 10**9  # USD each probe member is given: never short


def signed(key: Any, signer: str, type_: str, **fields: Any) -> dict[str, Any]:
    payload = validate_payload(
        type_,
        {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(datetime.now(UTC)),
            "actor": f"member:{signer}",
            **fields,
        },
    )
    return sign_payload(payload, type_, [key]).to_json()


def accepted(ledger: Ledger, raws: list[dict[str, Any]], what: str) -> None:
    outcomes = run_unit_of_work(ledger.sessions, lambda s: submit(s, ledger.ctx, raws))
    for outcome in outcomes:
        if not isinstance(outcome, Accepted):
            raise RuntimeError(f"{what} refused: {outcome!r}")


def register_probes(ledger: Ledger) -> dict[str, Any]:
    keys = {f"{PROBE_PREFIX}{i:02d}": generate_signing_key() for i in range(PROBES)}
    accepted(
        ledger,
        [
            signed(
                key,
                h,
                "member.register",
                handle=h,
                public_key=encode_public_key(bytes(key.verify_key)),
            )  # fmt: skip
            for h, key in keys.items()
        ],
        "member.register",
    )
    fund(ledger, keys)
    return keys


def fund(ledger: Ledger, keys: dict[str, Any]) -> None:
    accepted(
        ledger,
        [
            envelope(
                ledger.keys,
                "deposit",
                to=f"member:{h}",
                asset="USD",
                amount=FUNDS,
                external_ref=f"probe-{uuid.uuid4()}",
            )  # fmt: skip
            for h in keys
        ],
        "deposit",
    )


@dataclass
class Probe:
    """Transfers between the probe members, back to back, in a thread."""

    ledger: Ledger
    keys: dict[str, Any]
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(1)
        handles = sorted(self.keys)
        try:
            while not self.stop.is_set():
                a, b = rng.sample(handles, 2)
                raw = signed(self.keys[a], a, "transfer", **{"from": f"member:{a}",
                             "to": f"member:{b}", "asset": "USD", "amount": 1})  # fmt: skip
                started = time.perf_counter()
                accepted(self.ledger, [raw], "a probe transfer")
                self.latencies.append(time.perf_counter() - started)
        except BaseException as exc:  # reported by the main thread
            self.failure = exc

    @contextlib.contextmanager
    def running(self) -> Iterator[Probe]:
        self.latencies = []
        self.stop.clear()
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join()
        if self.failure is not None:
            raise RuntimeError("the probe failed") from self.failure


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase_row(
    variant: str, phase: str, seconds: float, steps: list[float], probe: list[float]
) -> dict[str, Any]:
    return {
        "variant": variant,
        "phase": phase,
        "seconds": seconds,
        "steps": len(steps),
        "longest_step_ms": max(steps) * 1000 if steps else 0.0,
        "median_step_ms": statistics.median(steps) * 1000 if steps else 0.0,
        "transfers": len(probe),
        "p50_ms": percentile(probe, 0.5) * 1000 if probe else 0.0,
        "p99_ms": percentile(probe, 0.99) * 1000 if probe else 0.0,
        "max_ms": max(probe) * 1000 if probe else 0.0,
    }


def run_variant(
    ledger: Ledger, keys: dict[str, Any], members: int, variant: str
) -> list[dict[str, Any]]:
    probe = Probe(ledger, keys)
    times = RunTimes()
    with probe.running():
        service_open(ledger.sessions, ledger.ctx, ledger.keys, 1, times)
    opened = list(probe.latencies)
    check(ledger.aux, members, closed=False, service=True)
    with probe.running():
        service_close(ledger.sessions, ledger.ctx, ledger.keys, 1, times)
    closed = list(probe.latencies)
    check(ledger.aux, members, closed=True, service=True)
    open_steps = [times.open_envelope, *times.fix_steps, *times.allocation_batches]
    close_steps = [times.close_envelope, *times.close_steps]
    rows = [
        phase_row(variant, "open", times.open_service, open_steps, opened),
        phase_row(variant, "close", times.close_service, close_steps, closed),
    ]
    for r in rows:
        log(
            f"  {variant} {r['phase']}: {r['seconds']:.1f} s, {r['steps']} steps (longest "
            f"{r['longest_step_ms']:.0f} ms); {r['transfers']} transfers, p50 "
            f"{r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.0f} ms"
        )
    log(
        f"  {variant}: open entry {times.open_envelope * 1000:.0f} ms, fix steps "
        f"{len(times.fix_steps)} (longest {max(times.fix_steps, default=0) * 1000:.0f} ms), "
        f"allocation batches {len(times.allocation_batches)} (longest "
        f"{max(times.allocation_batches, default=0) * 1000:.0f} ms); close entry "
        f"{times.close_envelope * 1000:.0f} ms, close steps {len(times.close_steps)} "
        f"(longest {max(times.close_steps, default=0) * 1000:.0f} ms)"
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--engine", default="postgresql", choices=("postgresql", "sqlite"))
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args(argv)
    started, load_before = datetime.now(UTC), loadavg()
    rows: list[dict[str, Any]] = []
    with fresh_ledger(args.engine, args.postgres_url, "ubc-bench-stall-") as ledger:
        populate(ledger.db, ledger.aux, args.members)
        keys = register_probes(ledger)
        ledger.db.vacuum(full=False)
        log(f"{args.engine}: {args.members:,} members and {PROBES} probe members")
        ledger.db.checkpoint()
        rows += run_variant(ledger, keys, args.members, "steps")
        reset(ledger.db, ledger.aux)
        fund(ledger, keys)
        ledger.db.checkpoint()
        whole = args.members + PROBES + 1
        with mock.patch.object(epochs, "CHUNK", whole), mock.patch.object(epochs, "STEP", whole):
            rows += run_variant(ledger, keys, args.members, "whole")
        server = ledger.db.server_version
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"- command: python {' '.join([sys.argv[0], *sys.argv[1:]])}")
    print(
        f"- CPU: {cpu_model()}, nproc {len(os.sched_getaffinity(0))}; load average (1, 5, "
        f"15 min): {load_before} before, {loadavg()} after"
    )
    print(
        f"- Python {platform.python_version()}, psycopg {version('psycopg')}; "
        f"{args.engine} {server}"
    )
    print(
        f"- steps: open steps and allocation batches of {epochs.CHUNK:,} members, close steps "
        f"of {epochs.STEP:,} member accounts; whole: one transaction each"
    )
    print()
    print(
        "| variant | phase | s | steps | longest step ms | median step ms | probe transfers "
        "| p50 ms | p99 ms | max ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['phase']} | {r['seconds']:.1f} | {r['steps']:,} "
            f"| {r['longest_step_ms']:,.0f} | {r['median_step_ms']:,.0f} | {r['transfers']:,} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
