"""Witnesses' cost on the write path, and how live the event stream is (issue 18).

Two measurements, in one run, on one engine (``--engine``, PostgreSQL by default), each
against the real service (``ubc serve`` as a subprocess on loopback, started and stopped
with scripts/bench_envelopes.py's machinery: fresh database, ``ubc init``, members
registered and funded through batches, transfers pre-signed on every core, clients that
send pre-built HTTP/1.1 requests):

**(a) Signed transfers per second, with two witnesses against none.** Two ``ubc witness
serve`` processes on loopback (each its own key and SQLite database) are configured as
``UBC_WITNESSES`` (quorum 2, ``UBC_WITNESS_INTERVAL_SECONDS=1``). The same server
settings, members and clients (``--clients`` concurrent single-envelope posts) run
``--runs`` rounds; each round measures the server without witnesses and the server with
them, one after the other, for ``--seconds`` each. The table shows medians, the ratio
(target: within 10%), and how many rounds of cosignatures the witnesses gave.

**(b) From acknowledgment to event.** Against the server without witnesses, a client
follows ``GET /journal/stream`` while writers post single transfers at ``--rate`` per
second (open loop: each send is scheduled at its own moment, whatever the answers) for
``--latency-seconds``. For each entry: the time from the 201 to the arrival of its SSE
event, p50, p99 and max (a negative delay: the event came before the writer's event loop
read the 201; the writers use httpx, whose CPU per request matters on a small machine, so
the note under the table says the rate actually reached). With ``--webhook`` a receiver
on loopback is registered as a webhook endpoint too, and the time to its delivery is
measured the same way.

    python scripts/bench_events.py --engine postgresql --runs 3 --seconds 5 \\
        --rate 500 --latency-seconds 10 --webhook

A smoke run (a few seconds): ``--runs 1 --seconds 1 --latency-seconds 2 --rate 100
--members 50``. The output is Markdown, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_envelopes as be  # noqa: E402

from ubc.signing import generate_signing_key, load_signing_key, vkey  # noqa: E402
from ubc.signing.keys import write_signing_key  # noqa: E402
from ubc.witness.cosignature import Cosigner  # noqa: E402

#: Extra environment of the server being started (the witnesses' settings).
_EXTRA_ENV: dict[str, str] = {}
_server_env = be.server_env


def _env_with_extra(db: be.Database, data_dir: Path) -> dict[str, str]:
    return {**_server_env(db, data_dir), **_EXTRA_ENV}


be.server_env = _env_with_extra  # running_server and ubc_init read it


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- witnesses ---------------------------------------------------------------------------------


@dataclass
class Witness:
    name: str
    vkey: str
    url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def witnesses(count: int, data_dir: Path, tmp: Path) -> Iterator[list[Witness]]:
    """``count`` witnesses on loopback, each configured for the ledger of ``data_dir``."""
    ledger_key = load_signing_key(data_dir / "ledger.key")
    ledger_vkey = vkey(be.ORIGIN, bytes(ledger_key.verify_key))
    started: list[Witness] = []
    try:
        for i in range(count):
            name = f"bench.witness/w{i}"
            key_path = tmp / f"witness{i}.key"
            key = generate_signing_key()
            write_signing_key(key_path, key)
            port = be._free_port()
            command = [
                *be.ubc_command(),
                "witness",
                "serve",
                "--key",
                str(key_path),
                "--name",
                name,
                "--log",
                f"{be.ORIGIN}={ledger_vkey}",
                "--database-url",
                f"sqlite:///{tmp / f'witness{i}.db'}",
                "--port",
                str(port),
            ]
            out = (tmp / f"witness{i}.log").open("wb")
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            witness = Witness(name, Cosigner(name, key).vkey, f"http://127.0.0.1:{port}", process)
            started.append(witness)
            _wait_listening(port, process)
        yield started
    finally:
        for w in started:
            be.stop_server(w.process)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("a witness did not start")
        with contextlib.suppress(OSError):
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        time.sleep(0.1)
    raise RuntimeError("a witness did not start listening")


def cosignatures(server: be.Server) -> int:
    """Cosignature lines on the latest checkpoint (the ledger's own line excluded)."""
    text = httpx.get(f"{server.url}/journal/checkpoint", timeout=10).text
    return max(0, sum(1 for line in text.splitlines() if line.startswith("— ")) - 1)


# --- (a) throughput ----------------------------------------------------------------------------


@dataclass
class Throughput:
    label: str
    rates: list[float]
    failed: int
    server_cpu: list[float]
    cosigned: int = 0


def throughput(args: argparse.Namespace, db: be.Database, tmp: Path) -> list[Throughput]:
    members = be.Members.generate(args.members)
    signer = be.Signer(members, seed=1)
    mode = be.Mode("single", 0, args.clients)
    clients = be.Clients("raw", 1)
    results = {"none": Throughput("no witness", [], 0, []), "two": Throughput("two", [], 0, [])}
    try:
        for label in ("none", "two"):
            data_dir = tmp / f"data-{label}"
            url = db.url
            if db.engine == "sqlite":  # a fresh file; PostgreSQL: emptied after each server
                url = f"sqlite:///{tmp / f'bench-{label}.db'}"
            this = be.Database(db.engine, url, db.server_version, db.settings)
            _EXTRA_ENV.clear()
            be.ubc_init(this, data_dir)
            with contextlib.ExitStack() as stack:
                if label == "two":
                    found = stack.enter_context(witnesses(2, data_dir, tmp))
                    _EXTRA_ENV.update(
                        UBC_WITNESSES=",".join(f"{w.vkey}@{w.url}" for w in found),
                        UBC_WITNESS_QUORUM="2",
                        UBC_WITNESS_INTERVAL_SECONDS="1",
                    )
                server = stack.enter_context(
                    be.running_server(this, data_dir, args.workers, tmp / f"server-{label}.log")
                )
                be.set_up_members(server, data_dir, members)
                for run in range(args.runs):
                    envelopes = signer.transfers(int(args.seconds * 4000) + 1000)
                    m = be.measure(be.Hosts([server]), mode, envelopes, clients, args.seconds)
                    r = results[label]
                    r.rates.append(m.rate)
                    r.failed += m.failed
                    r.server_cpu.append(m.server_cpu)
                    log(f"{label} run {run + 1}: {m.rate:.0f}/s ({m.failed} failed)")
                if label == "two":
                    time.sleep(2.5)  # a round after the last write
                    results[label].cosigned = cosignatures(server)
            if db.engine == "postgresql":
                _reset_postgres(db)
    finally:
        signer.close()
        _EXTRA_ENV.clear()
    return list(results.values())


def _reset_postgres(db: be.Database) -> None:
    """Empty the bench database for the next server (same database, same settings)."""
    import psycopg

    url = db.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


# --- (b) latency -------------------------------------------------------------------------------


class _Arrivals:
    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.lock = threading.Lock()

    def add(self, seq: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.at.setdefault(seq, now)


def _follow(url: str, token: str, start: int, arrivals: _Arrivals, stop: threading.Event) -> None:
    from ubc.client import UbcClient

    with UbcClient(url, token=token) as client:
        for event in client.events(from_seq=start, types=["transfer"]):
            arrivals.add(int(event["seq"]))
            if stop.is_set():
                return


@contextlib.contextmanager
def receiver(arrivals: _Arrivals) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            arrivals.add(int(json.loads(body)["seq"]))
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


async def _paced_writes(
    url: str, bodies: list[bytes], rate: float, acks: dict[int, float]
) -> tuple[int, float]:
    """Post ``bodies`` at ``rate`` per second (open loop); the ack time of each seq."""
    failed = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def send(body: bytes, at: float) -> None:
            nonlocal failed
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            try:
                answer = await client.post(
                    "/api/envelopes", content=body, headers={"content-type": "application/json"}
                )
            except httpx.HTTPError:
                failed += 1
                return
            if answer.status_code != 201:
                failed += 1
                return
            acks[int(answer.json()["seq"])] = time.perf_counter()

        began = time.perf_counter() + 0.2
        await asyncio.gather(*(send(b, began + i / rate) for i, b in enumerate(bodies)))
        return failed, time.perf_counter() - began


@dataclass
class Latency:
    what: str
    count: int
    missing: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def latency(args: argparse.Namespace, db: be.Database, tmp: Path) -> tuple[list[Latency], str]:
    members = be.Members.generate(args.members)
    signer = be.Signer(members, seed=2)
    data_dir = tmp / "data-latency"
    this = db
    if db.engine == "sqlite":
        this = be.Database(db.engine, f"sqlite:///{tmp / 'bench-latency.db'}", db.server_version)
    be.ubc_init(this, data_dir)
    try:
        with be.running_server(this, data_dir, args.workers, tmp / "server-latency.log") as srv:
            size = be.set_up_members(srv, data_dir, members)
            token = (data_dir / "operator.token").read_text().strip()
            stream, hook = _Arrivals(), _Arrivals()
            with contextlib.ExitStack() as stack:
                if args.webhook:
                    hook_url = stack.enter_context(receiver(hook))
                    answer = httpx.post(
                        f"{srv.url}/api/webhooks",
                        json={"url": hook_url, "types": ["transfer"]},
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=10,
                    )
                    answer.raise_for_status()
                stop = threading.Event()
                follower = threading.Thread(
                    target=_follow, args=(srv.url, token, size, stream, stop), daemon=True
                )
                follower.start()
                time.sleep(0.5)
                n = int(args.rate * args.latency_seconds)
                bodies = signer.transfers(n)
                acks: dict[int, float] = {}
                failed, took = asyncio.run(_paced_writes(srv.url, bodies, args.rate, acks))
                time.sleep(2.0)  # the last events
                stop.set()
            rows = [_latency("SSE event", acks, stream)]
            if args.webhook:
                rows.append(_latency("webhook delivery", acks, hook))
            note = f"{len(acks)} writes acknowledged in {took:.1f} s ({len(acks) / took:.0f}/s)"
            if failed:
                note += f", {failed} failed"
            return rows, note
    finally:
        signer.close()


def _latency(what: str, acks: dict[int, float], arrivals: _Arrivals) -> Latency:
    with arrivals.lock:
        delays = [(arrivals.at[s] - t) * 1000 for s, t in acks.items() if s in arrivals.at]
    missing = len(acks) - len(delays)
    if not delays:
        return Latency(what, 0, missing, float("nan"), float("nan"), float("nan"))
    delays.sort()

    def pct(q: float) -> float:
        return delays[min(len(delays) - 1, int(q * len(delays)))]

    return Latency(what, len(delays), missing, pct(0.50), pct(0.99), delays[-1])


# --- report ------------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    db: be.Database,
    rates: list[Throughput] | None,
    delays: tuple[list[Latency], str] | None,
) -> str:
    lines = [
        f"### Events and witnesses ({db.engine} {db.server_version})",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"`ubc serve --workers {args.workers}`; load average {os.getloadavg()[0]:.2f}.",
        "",
    ]
    if rates:
        base = statistics.median(rates[0].rates)
        lines += [
            f"**Signed transfers per second** ({args.clients} clients, single envelopes, "
            f"{args.runs} × {args.seconds:g} s, medians):",
            "",
            "| witnesses | transfers/s | vs none | server CPU | failed | cosignatures |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rates:
            rate = statistics.median(r.rates)
            ratio = f"{rate / base:.1%}" if base else "-"
            cpu = statistics.median(r.server_cpu)
            cosigned = str(r.cosigned) if r.label != "no witness" else "-"
            lines.append(
                f"| {r.label} | {rate:,.0f} | {ratio} | {cpu:.2f} | {r.failed} | {cosigned} |"
            )
        lines += ["", "Target: with two witnesses within 10% of none.", ""]
    if delays:
        rows, note = delays
        lines += [
            f"**From a write's 201 to its event** at {args.rate:g} writes/s for "
            f"{args.latency_seconds:g} s ({note}):",
            "",
            "| to | entries | missing | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for d in rows:
            lines.append(
                f"| {d.what} | {d.count} | {d.missing} | {d.p50_ms:.1f} | {d.p99_ms:.1f} | "
                f"{d.max_ms:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--postgres-url", default=be.DEFAULT_POSTGRES_URL)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--webhook", action="store_true", help="also time webhook deliveries")
    parser.add_argument("--only", choices=["throughput", "latency"], default=None)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="ubc-bench-events-") as tmp_name,
        be.fresh_database(args.engine, args.postgres_url, Path(tmp_name)) as db,
    ):
        tmp = Path(tmp_name)
        rates = throughput(args, db, tmp) if args.only in (None, "throughput") else None
        delays = latency(args, db, tmp) if args.only in (None, "latency") else None
        print(report(args, db, rates, delays))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
