"""Memory and time of the utilization report on a large epoch (issue 14, item 3).

For each size, in a fresh interpreter (so that ``ru_maxrss`` is that size's own): members
are created with ``bench_epoch``'s set-based setup, an epoch is opened and closed through
the write path (allocations and expiries: two postings per member each), then

- the whole report is streamed as CSV exactly as ``GET /api/reports/utilization`` with
  ``Accept: text/csv`` streams it (``ubc.epochs.report.csv_chunks`` on one session, a
  server-side cursor), every row counted and the ``total`` row checked against the
  allocations and expiries the setup made; peak RSS before and after the stream;
- the first JSON page (1,000 members and the totals of the whole epoch) is timed.

    python scripts/bench_report.py --engine postgresql --members 100000,1000000

The stream is measured in-process, without HTTP: the server adds its constant per
request cost around the same generator.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_epoch import (  # noqa: E402  (a sibling script)
    ASSET,
    CAP,
    DEFAULT_POSTGRES_URL,
    TIERS,
    RunTimes,
    fresh_ledger,
    log,
    populate,
    service_close,
    service_open,
    standard_members,
)

from ubc.epochs import report  # noqa: E402
from ubc.epochs import service as epochs  # noqa: E402

PRICE = "0.000002"


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_size(engine: str, members: int, postgres_url: str) -> dict[str, Any]:
    with fresh_ledger(engine, postgres_url, "ubc-bench-report-") as ledger:
        sessions = ledger.sessions
        populate(ledger.db, ledger.aux, members)
        ledger.db.vacuum(full=False)
        times = RunTimes()
        service_open(sessions, ledger.ctx, ledger.keys, 1, times)
        service_close(sessions, ledger.ctx, ledger.keys, 1, times)
        ledger.db.vacuum(full=False)
        log(f"  {engine} {members:,}: epoch opened and closed")
        rss_before = maxrss_mib()
        started = time.perf_counter()
        rows = 0
        size = 0
        last = ""
        with sessions() as session:
            info = epochs.get_epoch(session, 1)
            for chunk in report.csv_chunks(session, info, cu_price_usd=PRICE):
                rows += chunk.count("\n")
                size += len(chunk)
                last = chunk
        csv_seconds = time.perf_counter() - started
        rss_after_csv = maxrss_mib()
        total = last.strip().splitlines()[-1].split(",")
        standard = standard_members(members)
        allocated = standard * TIERS["standard"] + (members - standard) * TIERS["basic"]
        expired = standard * (TIERS["standard"] - CAP)
        assert rows == members + 2, (rows, members)  # header, members, total
        assert total[0] == "total", total
        assert int(total[1]) == allocated, total
        assert int(total[8]) == expired, total
        started = time.perf_counter()
        with sessions() as session:
            page = report.utilization(session, 1, cu_price_usd=PRICE)
        page_seconds = time.perf_counter() - started
        assert len(page.members) == report.DEFAULT_LIMIT
        assert page.totals is not None
        assert page.totals.allocated == allocated
    return {
        "engine": engine,
        "members": members,
        "asset": ASSET,
        "csv_seconds": csv_seconds,
        "csv_bytes": size,
        "rss_before_mib": rss_before,
        "rss_after_csv_mib": rss_after_csv,
        "first_page_seconds": page_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="postgresql", choices=("postgresql", "sqlite"))
    parser.add_argument("--members", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(bench_size(args.engine, args.child, args.postgres_url)))
        return 0
    results = []
    for members in (int(m) for m in args.members.split(",")):
        log(f"{args.engine}, {members:,} members")
        done = subprocess.run(
            [sys.executable, __file__, "--engine", args.engine, "--child", str(members),
             "--postgres-url", args.postgres_url],
            check=True, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        "| engine | members | CSV stream s | CSV MB | rows/s | peak RSS MiB before / after "
        "the stream | first JSON page s (1,000 members + totals) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['engine']} | {r['members']:,} | {r['csv_seconds']:.1f} | "
            f"{r['csv_bytes'] / 1e6:.0f} | {r['members'] / r['csv_seconds']:,.0f} | "
            f"{r['rss_before_mib']:.0f} / {r['rss_after_csv_mib']:.0f} | "
            f"{r['first_page_seconds']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
