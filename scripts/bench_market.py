"""Market fills per second against single signed transfers, over HTTP, on PostgreSQL.

Starts the real service (``ubc serve``, ``--workers`` passed through) on a fresh PostgreSQL
database and data dir, sets a market fee (a ``ledger.config`` signed by the ledger and the
operator, so that every fill has its three legs), registers and funds ``--sellers`` sellers
and ``--buyers`` buyers, and has the sellers put up ``--offers`` offers of
``--units-per-offer`` CU each. Then, alternating within each of ``--runs`` rounds:

- **transfer**: each buyer is one client posting, one at a time over its own keep-alive
  connection, ``transfer`` envelopes of 1 CU to a seller (``POST /api/envelopes``);
- **fill**: each buyer is one client posting ``offer.fill`` envelopes of 1 unit of a
  random offer among them (``POST /api/envelopes``): three legs each (buyer → seller,
  buyer → fees, escrow → buyer).

Every envelope is signed before the clock starts; a measurement lasts ``--seconds``
(clients stop sending at the deadline, the time runs until the last answer). Every answer
must be 201. The table shows medians and the ratio fill cost / transfer cost
(= transfers/s ÷ fills/s; target ≤ 2).

    python scripts/bench_market.py --runs 5 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from nacl.signing import SigningKey
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_envelopes as be  # noqa: E402

from ubc.config import Settings  # noqa: E402
from ubc.db import make_engine, make_session_factory, unit_of_work  # noqa: E402
from ubc.envelopes import service as envelopes  # noqa: E402
from ubc.envelopes.payloads import format_timestamp, validate_payload  # noqa: E402
from ubc.runtime import load_runtime  # noqa: E402
from ubc.signing import encode_public_key, generate_signing_key, load_signing_key  # noqa: E402

ORIGIN = be.ORIGIN
FEE_BPS = 25


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def envelope(type_: str, keys: list[SigningKey], **fields: Any) -> dict[str, Any]:
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    body = {
        "ledger": ORIGIN,
        "id": str(uuid.uuid4()),
        "created_at": format_timestamp(datetime.now(UTC)),
        **fields,
    }
    return envelopes.sign_payload(validate_payload(type_, body), type_, keys).to_json()


def post_all(client: httpx.Client, items: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    bodies = []
    for start in range(0, len(items), 1000):
        chunk = items[start : start + 1000]
        response = client.post("/api/envelopes/batch", json={"atomic": True, "envelopes": chunk})
        if response.status_code != 200:
            raise RuntimeError(f"{what}: HTTP {response.status_code} {response.text[:500]}")
        for result in response.json()["results"]:
            if result["status"] != 201:
                raise RuntimeError(f"{what}: {result}")
            bodies.append(result["body"])
    return bodies


def set_fee(db_url: str, data_dir: Path) -> None:
    """A ledger.config with a market fee, signed by the ledger and the operator keys."""
    engine = make_engine(db_url)
    try:
        sessions = make_session_factory(engine)
        with unit_of_work(sessions) as session:
            runtime = load_runtime(
                Settings(database_url=db_url, data_dir=data_dir, origin=ORIGIN), session
            )
        with unit_of_work(sessions) as session:
            body = json.loads(
                session.execute(
                    text("SELECT body FROM ledger_config ORDER BY id DESC LIMIT 1")
                ).scalar_one()
            )
            body.update(
                id=str(uuid.uuid4()),
                created_at=format_timestamp(datetime.now(UTC)),
                market_fee_bps=FEE_BPS,
            )
            signed = envelopes.sign_payload(
                validate_payload("ledger.config", body),
                "ledger.config",
                [
                    load_signing_key(data_dir / "ledger.key"),
                    load_signing_key(data_dir / "operator.key"),
                ],
            )
            [outcome] = envelopes.submit(session, runtime.ctx, [signed.to_json()], internal=True)
            assert isinstance(outcome, envelopes.Accepted), outcome
    finally:
        engine.dispose()


class World:
    def __init__(self, sellers: int, buyers: int) -> None:
        self.sellers = [(f"seller{i}", generate_signing_key()) for i in range(sellers)]
        self.buyers = [(f"buyer{i}", generate_signing_key()) for i in range(buyers)]
        self.offers: list[str] = []

    def set_up(self, url: str, data_dir: Path, offers: int, units: int) -> None:
        operator = load_signing_key(data_dir / "operator.key")
        with httpx.Client(base_url=url, timeout=300) as client:
            post_all(
                client,
                [
                    envelope(
                        "member.register",
                        [key],
                        actor=f"member:{handle}",
                        handle=handle,
                        public_key=encode_public_key(bytes(key.verify_key)),
                    )
                    for handle, key in self.sellers + self.buyers
                ],
                "register",
            )
            deposits = []
            per_seller = -(-offers // len(self.sellers))
            for handle, _ in self.sellers:
                deposits.append((handle, "CU", per_seller * units))
            for handle, _ in self.buyers:
                deposits += [(handle, "USD", 10**12), (handle, "CU", 10**9)]
            post_all(
                client,
                [
                    envelope(
                        "deposit",
                        [operator],
                        actor="operator",
                        to=f"member:{h}",
                        asset=a,
                        amount=n,
                        external_ref=f"bench-{h}-{a}",
                    )
                    for h, a, n in deposits
                ],
                "deposit",
            )
            creates = []
            for index in range(offers):
                handle, key = self.sellers[index % len(self.sellers)]
                creates.append(
                    envelope(
                        "offer.create",
                        [key],
                        actor=f"member:{handle}",
                        sell_asset="CU",
                        sell_amount=units,
                        price_asset="USD",
                        price_amount=units * (100 + index),
                    )
                )
            self.offers = [b["id"] for b in post_all(client, creates, "offer.create")]

    def requests(
        self, mode: str, url: str, per_client: int, rng: random.Random
    ) -> list[list[bytes]]:
        host = url.removeprefix("http://")
        out = []
        for handle, key in self.buyers:
            items = []
            for _ in range(per_client):
                if mode == "fill":
                    env = envelope(
                        "offer.fill",
                        [key],
                        actor=f"member:{handle}",
                        offer_id=rng.choice(self.offers),
                        amount=1,
                    )
                else:
                    env = envelope(
                        "transfer",
                        [key],
                        actor=f"member:{handle}",
                        from_=f"member:{handle}",
                        to=f"member:{rng.choice(self.sellers)[0]}",
                        asset="CU",
                        amount=1,
                    )
                body = json.dumps(env).encode()
                items.append(
                    b"POST /api/envelopes HTTP/1.1\r\nHost: "
                    + host.encode()
                    + b"\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            out.append(items)
        return out


async def _client(
    host: str, port: int, requests: list[bytes], end_at: float
) -> tuple[int, list[str]]:
    reader, writer = await asyncio.open_connection(host, port)
    ok, errors = 0, []
    try:
        for request in requests:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.index(b"\r\ncontent-length:") + 17
            content = await reader.readexactly(int(head[at : head.index(b"\r\n", at)]))
            if status == 201:
                ok += 1
            elif len(errors) < 5:
                errors.append(f"{status} {content[:200]!r}")
            if time.time() >= end_at:
                break
    finally:
        writer.close()
    return ok, errors


async def drive(
    url: str, per_client: list[list[bytes]], seconds: float
) -> tuple[int, float, list[str]]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.time()
    results = await asyncio.gather(
        *(_client(host, int(port), reqs, started + seconds) for reqs in per_client)
    )
    elapsed = time.time() - started
    errors = [e for _, errs in results for e in errs]
    return sum(ok for ok, _ in results), elapsed, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--buyers", type=int, default=16)
    parser.add_argument("--sellers", type=int, default=20)
    parser.add_argument("--offers", type=int, default=100)
    parser.add_argument("--units-per-offer", type=int, default=1_000_000)
    parser.add_argument("--per-client", type=int, default=0, help="envelopes signed per client")
    parser.add_argument("--postgres-url", default=be.DEFAULT_POSTGRES_URL)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    per_client = args.per_client or int(args.seconds * 250)
    rng = random.Random(args.seed)
    rates: dict[str, list[float]] = {"transfer": [], "fill": []}
    with tempfile.TemporaryDirectory(prefix="ubc-bench-market-") as tmp_name:
        tmp = Path(tmp_name)
        with be.fresh_database("postgresql", args.postgres_url, tmp) as db:
            data_dir = tmp / "data"
            be.ubc_init(db, data_dir)
            with be.running_server(db, data_dir, args.workers, tmp / "server.log") as server:
                set_fee(db.url, data_dir)
                world = World(args.sellers, args.buyers)
                world.set_up(server.url, data_dir, args.offers, args.units_per_offer)
                log(
                    f"{len(world.buyers)} buyers, {len(world.offers)} offers; "
                    f"PostgreSQL {db.server_version}, load {os.getloadavg()}"
                )
                for run in range(args.runs):
                    for mode in ("transfer", "fill") if run % 2 == 0 else ("fill", "transfer"):
                        requests = world.requests(mode, server.url, per_client, rng)
                        ok, elapsed, errors = asyncio.run(drive(server.url, requests, args.seconds))
                        if errors:
                            raise RuntimeError(f"{mode}: answers other than 201: {errors}")
                        rates[mode].append(ok / elapsed)
                        log(
                            f"run {run + 1} {mode}: {ok} in {elapsed:.2f} s = {ok / elapsed:,.0f}/s"
                        )
                with httpx.Client(base_url=server.url) as client:
                    size = be.journal_size(client)
    transfer = statistics.median(rates["transfer"])
    fill = statistics.median(rates["fill"])
    print(f"load average after: {os.getloadavg()}; journal entries: {size}")
    print()
    print("| mode | clients | median /s | runs (min–max) |")
    print("|---|---:|---:|---:|")
    for mode, median in (("signed transfer (1 leg)", transfer), ("offer.fill (3 legs)", fill)):
        runs = rates["transfer" if mode.startswith("signed") else "fill"]
        print(f"| {mode} | {args.buyers} | {median:,.0f} | {min(runs):,.0f}–{max(runs):,.0f} |")
    print()
    ratio = transfer / fill
    verdict = "met" if ratio <= 2 else "not met"
    print(f"cost of a fill / cost of a transfer: {ratio:.2f} (target ≤ 2: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
