"""Witnesses' cost on the write path, and how live the event stream is (issue 18).

Two measurements, in one run, on one engine (``--engine``, PostgreSQL by default), each
against the real service (``ubc serve`` as a subprocess on loopback, started and stopped
with scripts/bench_envelopes.py's machinery: fresh database, ``ubc init``, members
registered and funded through batches, transfers pre-signed on every core, clients that
send pre-built HTTP/1.1 requests):

**(a) Signed transfers per second, with two witnesses against none.** Two servers run
side by side, each on its own database with the same members: one without witnesses, one
with two ``ubc witness serve`` processes on loopback (each its own key and SQLite
database) as ``UBC_WITNESSES`` (quorum 2, ``UBC_WITNESS_INTERVAL_SECONDS=1``). The
clients (``--clients`` concurrent single-envelope posts) measure them in turn, alternating
(none, two, two, none, none, two...) for ``--runs`` rounds of ``--seconds`` each, so that a
drift of the machine's load weighs on both alike. The table shows medians and ranges, the
ratio (target: within 10%), the CPU per transfer of the server and the witnesses, and how
many cosignatures the latest checkpoint carries at the end.

**(b) From acknowledgment to event.** Against a third server (no witnesses), a reader
process follows ``GET /journal/stream`` while a writer process posts pre-signed single
transfers at ``--rate`` per second for ``--latency-seconds``: open loop (request i goes out
at ``start + i / rate`` on whichever of ``--connections`` keep-alive connections is free,
whatever the earlier answers), raw HTTP/1.1 on asyncio streams. Both stamp what they see
with ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process of the machine),
so the delay of an entry is its event's arrival minus its 201's arrival. The report says
the rate reached next to the target and calls the measurement **not valid** when the
writer did not hold it (under 98% of it, failures, or sends more than 100 ms late). With
``--webhook`` a receiver on loopback (this process) is registered as a webhook endpoint
too, and the time to its delivery is measured the same way.

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
import multiprocessing as mp
import os
import queue
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
import _bench  # noqa: E402
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
    server_cpu: list[float]  # CPU seconds per second of the server's processes
    cpu_per_transfer: list[float]  # µs of server (+ witnesses) CPU per accepted transfer
    witness_cpu: list[float]  # CPU seconds per second of the witness processes
    cosigned: int = 0


def _database(db: be.Database, tmp: Path, name: str, stack: contextlib.ExitStack) -> be.Database:
    """A database of its own for ``name``: a SQLite file, or a new PostgreSQL database."""
    if db.engine == "sqlite":
        return be.Database(db.engine, f"sqlite:///{tmp / f'bench-{name}.db'}", db.server_version)
    own = stack.enter_context(
        _bench.fresh_database(db.engine, db.url, tmp, f"ubc_bench_events_{os.getpid()}_{name}")
    )
    return be.Database(own.engine, own.url, own.server_version, own.settings)


def throughput(args: argparse.Namespace, db: be.Database, tmp: Path) -> list[Throughput]:
    """Both servers (each its own database) run side by side; the runs alternate between
    them (none, two, two, none, none, two...), so that a drift of the machine's load over
    the run weighs on both alike."""
    members = be.Members.generate(args.members)
    signer = be.Signer(members, seed=1)
    mode = be.Mode("single", 0, args.clients)
    clients = be.Clients("raw", 1)
    results = {
        "none": Throughput("no witness", [], 0, [], [], []),
        "two": Throughput("two", [], 0, [], [], []),
    }
    try:
        with contextlib.ExitStack() as stack:
            servers: dict[str, be.Server] = {}
            found: list[Witness] = []
            for label in ("none", "two"):
                this = _database(db, tmp, label, stack)
                data_dir = tmp / f"data-{label}"
                _EXTRA_ENV.clear()
                be.ubc_init(this, data_dir)
                if label == "two":
                    found = stack.enter_context(witnesses(2, data_dir, tmp))
                    _EXTRA_ENV.update(
                        UBC_WITNESSES=",".join(f"{w.vkey}@{w.url}" for w in found),
                        UBC_WITNESS_QUORUM="2",
                        UBC_WITNESS_INTERVAL_SECONDS="1",
                    )
                servers[label] = stack.enter_context(
                    be.running_server(this, data_dir, args.workers, tmp / f"server-{label}.log")
                )
                _EXTRA_ENV.clear()
                be.set_up_members(servers[label], data_dir, members)
            witness_pids = [w.process.pid for w in found]
            for run in range(args.runs):
                order = ("none", "two") if run % 2 == 0 else ("two", "none")
                for label in order:
                    envelopes = signer.transfers(int(args.seconds * 2500) + 1000)
                    time.sleep(1.5)  # the other server's last witness round, if any
                    w_before = _cpu_of(witness_pids)
                    m = be.measure(
                        be.Hosts([servers[label]]), mode, envelopes, clients, args.seconds
                    )
                    w_cpu = _cpu_of(witness_pids) - w_before if label == "two" else 0.0
                    r = results[label]
                    r.rates.append(m.rate)
                    r.failed += m.failed
                    r.server_cpu.append(m.server_cpu)
                    r.witness_cpu.append(w_cpu / m.seconds)
                    per = (m.server_cpu * m.seconds + w_cpu) / max(m.ok, 1) * 1e6
                    r.cpu_per_transfer.append(per)
                    log(
                        f"run {run + 1} {label}: {m.rate:.0f}/s, server CPU {m.server_cpu:.2f}, "
                        f"{per:.0f} µs CPU per transfer ({m.failed} failed)"
                    )
            time.sleep(2.5)  # a round after the last write
            results["two"].cosigned = cosignatures(servers["two"])
    finally:
        signer.close()
        _EXTRA_ENV.clear()
    return list(results.values())


def _cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        total += sum(_bench.tree_cpu(pid).values())
    return total


# --- (b) latency -------------------------------------------------------------------------------
#
# Three processes besides the server: the writer (raw HTTP/1.1 on asyncio streams, open
# loop), the SSE reader, and this one (the webhook receiver). Each stamps what it sees with
# time.monotonic(), which is CLOCK_MONOTONIC: one clock for every process of the machine.


def _writer_process(
    address: tuple[str, int],
    requests: list[bytes],
    rate: float,
    connections: int,
    start_at: float,
    out: Any,
) -> None:
    _bench.child_signals()
    try:
        run = _paced(address, requests, rate, connections, start_at)
        result = _bench.uvloop.run(run) if _bench.uvloop is not None else asyncio.run(run)
        out.put(("writer", result))
    except BaseException as exc:  # report it rather than leave the parent waiting
        out.put(("writer", {"crash": f"{type(exc).__name__}: {exc}"}))


async def _paced(
    address: tuple[str, int],
    requests: list[bytes],
    rate: float,
    connections: int,
    start_at: float,
) -> dict[str, Any]:
    """Request i is sent at ``start_at + i / rate`` (monotonic) by whichever connection is
    free, whatever the earlier answers: open loop. A request sent late (no connection was
    free) is counted in the send lag."""
    host, port = address
    pending = iter(enumerate(requests))
    answers: list[tuple[int, float, float, int, bytes]] = []  # i, sent, acked, status, body
    errors: list[str] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i, request in pending:
                delay = start_at + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.monotonic()
                try:
                    writer.write(request)
                    status, head, body = await _bench._read_answer(reader)
                except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                    if len(errors) < 10:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    answers.append((i, sent, time.monotonic(), -1, b""))
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                answers.append((i, sent, time.monotonic(), status, body))
        finally:
            writer.close()

    cpu = time.process_time()
    await asyncio.gather(*(connection() for _ in range(connections)))
    return {"answers": answers, "errors": errors, "cpu": time.process_time() - cpu}


def _reader_process(url: str, token: str, start: int, expect: int, out: Any, stop: Any) -> None:
    """Follow the stream from ``start``; the arrival time of each seq, until ``expect``
    events came or ``stop`` is set."""
    _bench.child_signals()
    from ubc.client import UbcClient

    arrivals: dict[int, float] = {}
    try:
        done = threading.Event()

        def follow() -> None:
            with UbcClient(url, token=token) as client:
                for event in client.events(from_seq=start, types=["transfer"]):
                    arrivals.setdefault(int(event["seq"]), time.monotonic())
                    if len(arrivals) >= expect:
                        break
            done.set()

        threading.Thread(target=follow, daemon=True).start()
        while not done.is_set() and not stop.is_set():
            time.sleep(0.05)
        out.put(("reader", dict(arrivals)))
    except BaseException as exc:
        out.put(("reader", {"crash": f"{type(exc).__name__}: {exc}"}))


class _Arrivals:
    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.lock = threading.Lock()

    def add(self, seq: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.at.setdefault(seq, now)


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


@dataclass
class Latency:
    what: str
    count: int
    missing: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Pace:
    """What the writer achieved against what it was asked."""

    target: float
    sent: int
    acked: int
    failed: int
    seconds: float  # from the first scheduled send to the last acknowledgment
    send_lag_p99_ms: float  # how late the sends were against their schedule
    ack_p50_ms: float
    ack_p99_ms: float
    client_cpu: float
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    @property
    def valid(self) -> bool:
        """The target rate was held: 98% of it reached, nothing failed, and no send went
        out more than 100 ms after its moment."""
        return self.rate >= 0.98 * self.target and not self.failed and self.send_lag_p99_ms < 100


def latency(
    args: argparse.Namespace, db: be.Database, tmp: Path
) -> tuple[list[Latency], Pace, str]:
    members = be.Members.generate(args.members)
    signer = be.Signer(members, seed=2)
    with contextlib.ExitStack() as dbs:
        this = _database(db, tmp, "latency", dbs)
        data_dir = tmp / "data-latency"
        be.ubc_init(this, data_dir)
        try:
            with be.running_server(this, data_dir, args.workers, tmp / "server-latency.log") as srv:
                return _latency_against(args, srv, data_dir, members, signer)
        finally:
            signer.close()


def _latency_against(
    args: argparse.Namespace,
    srv: be.Server,
    data_dir: Path,
    members: be.Members,
    signer: be.Signer,
) -> tuple[list[Latency], Pace, str]:
    size = be.set_up_members(srv, data_dir, members)
    token = (data_dir / "operator.token").read_text().strip()
    n = int(args.rate * args.latency_seconds)
    bodies = signer.transfers(n)  # signed before the clock starts
    requests = be.raw_requests(srv.url, be.Mode("single", 0, 1), bodies)
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    hook = _Arrivals()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    stop = ctx.Event()
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
        reader = ctx.Process(target=_reader_process, args=(srv.url, token, size, n, out, stop))
        reader.start()
        time.sleep(1.0)  # the stream is open
        start_at = time.monotonic() + 0.5
        cpu_before = srv.cpu()
        writer = ctx.Process(
            target=_writer_process,
            args=((host, int(port)), requests, args.rate, args.connections, start_at, out),
        )
        writer.start()
        got: dict[str, Any] = {}

        def collect(until: float, *wanted: str) -> None:
            while not all(w in got for w in wanted) and time.monotonic() < until:
                with contextlib.suppress(queue.Empty):
                    got.update([out.get(timeout=0.5)])

        try:
            collect(time.monotonic() + args.latency_seconds + 300, "writer")
            server_cpu = be._cpu_used(cpu_before, srv.cpu())
            # The last events and deliveries: up to 15 s more.
            collect(time.monotonic() + 15, "reader")
            webhook_deadline = time.monotonic() + (15 if args.webhook else 0)
            while args.webhook and time.monotonic() < webhook_deadline:
                with hook.lock:
                    if len(hook.at) >= n:
                        break
                time.sleep(0.1)
            stop.set()
            collect(time.monotonic() + 30, "writer", "reader")
            if "writer" not in got or "reader" not in got:
                raise RuntimeError(
                    f"no result from the {'writer' if 'writer' not in got else 'reader'}"
                )
        finally:
            stop.set()
            for p in (writer, reader):
                p.join(10)
                if p.is_alive():
                    p.terminate()
                    p.join()
    wrote, arrivals = got["writer"], got["reader"]
    for part in (wrote, arrivals):
        if "crash" in part:
            raise RuntimeError(f"a bench process failed: {part['crash']}")
    acks: dict[int, float] = {}
    lags, waits = [], []
    failed = 0
    for i, sent, acked, status, body in wrote["answers"]:
        if status != 201:
            failed += 1
            continue
        acks[int(json.loads(body)["seq"])] = acked
        lags.append((sent - (start_at + i / args.rate)) * 1000)
        waits.append((acked - sent) * 1000)
    last = max((a for _, _, a, _, _ in wrote["answers"]), default=start_at)
    pace = Pace(
        target=args.rate,
        sent=len(wrote["answers"]),
        acked=len(acks),
        failed=failed,
        seconds=last - start_at,
        send_lag_p99_ms=_bench.percentile(lags, 0.99),
        ack_p50_ms=_bench.percentile(waits, 0.50),
        ack_p99_ms=_bench.percentile(waits, 0.99),
        client_cpu=wrote["cpu"],
        errors=wrote["errors"],
    )
    rows = [_latency("SSE event", acks, arrivals)]
    if args.webhook:
        with hook.lock:
            rows.append(_latency("webhook delivery", acks, dict(hook.at)))
    note = f"server CPU {server_cpu / max(pace.seconds, 1e-9):.2f} s/s"
    return rows, pace, note


def _latency(what: str, acks: dict[int, float], arrivals: dict[int, float]) -> Latency:
    delays = [(arrivals[s] - t) * 1000 for s, t in acks.items() if s in arrivals]
    missing = len(acks) - len(delays)
    if not delays:
        return Latency(what, 0, missing, float("nan"), float("nan"), float("nan"))
    return Latency(
        what,
        len(delays),
        missing,
        _bench.percentile(delays, 0.50),
        _bench.percentile(delays, 0.99),
        max(delays),
    )


# --- report ------------------------------------------------------------------------------------


def _span(values: list[float], fmt: str = ",.0f") -> str:
    return f"{min(values):{fmt}}–{max(values):{fmt}}" if values else "-"


def report(
    args: argparse.Namespace,
    db: be.Database,
    rates: list[Throughput] | None,
    delays: tuple[list[Latency], Pace, str] | None,
) -> str:
    lines = [
        f"### Events and witnesses ({db.engine} {db.server_version})",
        "",
        f"{_bench.cpu_model()}, {os.cpu_count()} cores; `ubc serve --workers {args.workers}`; "
        f"load average at the end {_bench.loadavg()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]
    if rates:
        base = statistics.median(rates[0].rates)
        lines += [
            f"**Signed transfers per second** ({args.clients} clients, single envelopes, "
            f"{args.runs} runs of {args.seconds:g} s each, alternating: none, two, two, none..., "
            "medians and ranges):",
            "",
            "| witnesses | transfers/s | range | vs none | server CPU | witnesses' CPU | "
            "CPU µs/transfer | failed | cosignatures |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rates:
            rate = statistics.median(r.rates)
            ratio = f"{rate / base:.1%}" if base else "-"
            two = r.label != "no witness"
            lines.append(
                f"| {r.label} | {rate:,.0f} | {_span(r.rates)} | {ratio} | "
                f"{statistics.median(r.server_cpu):.2f} | "
                f"{statistics.median(r.witness_cpu):.3f} | "
                f"{statistics.median(r.cpu_per_transfer):,.0f} | {r.failed} | "
                f"{r.cosigned if two else '-'} |"
            )
        ratio = statistics.median(rates[1].rates) / base if base else 0.0
        pairs = [b / a for a, b in zip(rates[0].rates, rates[1].rates, strict=True) if a]
        lines += [
            "",
            f"Per run, two witnesses / none: {', '.join(f'{p:.0%}' for p in pairs)} "
            f"(median {statistics.median(pairs):.1%})."
            if pairs
            else "",
            "",
            "Target (two witnesses within 10% of none): "
            + ("**met**" if ratio >= 0.90 else f"**not met** ({ratio:.1%})"),
            "",
        ]
    if delays:
        rows, pace, note = delays
        verdict = (
            "valid: the target rate was held"
            if pace.valid
            else "**NOT VALID: the writer did not hold the target rate**"
        )
        lines += [
            f"**From a write's 201 to its event**: writes paced at {pace.target:g}/s (open loop, "
            f"{args.connections} keep-alive connections, a process of their own) for "
            f"{args.latency_seconds:g} s: {pace.acked} acknowledged at **{pace.rate:.0f}/s** "
            f"(target {pace.target:g}/s), {pace.failed} failed, sends late by at most "
            f"{pace.send_lag_p99_ms:.1f} ms (p99), 201 within {pace.ack_p50_ms:.1f} ms (p50) / "
            f"{pace.ack_p99_ms:.1f} ms (p99) of the send; {note}; {verdict}.",
            "",
            "| to | entries | missing | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for d in rows:
            lines.append(
                f"| {d.what} | {d.count} | {d.missing} | {d.p50_ms:.1f} | {d.p99_ms:.1f} | "
                f"{d.max_ms:.1f} |"
            )
        if pace.errors:
            lines += ["", f"Writer errors: {pace.errors[:3]}"]
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
    parser.add_argument(
        "--connections", type=int, default=64, help="the paced writer's keep-alive connections"
    )
    parser.add_argument("--webhook", action="store_true", help="also time webhook deliveries")
    parser.add_argument("--only", choices=["throughput", "latency"], default=None)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="ubc-bench-events-") as tmp_name,
        be.fresh_database(args.engine, args.postgres_url, Path(tmp_name)) as db,
    ):
        tmp = Path(tmp_name)
        rates = throughput(args, db, tmp) if args.only in (None, "throughput") else None
        if rates:  # on record even if what follows fails
            log(report(args, db, rates, None))
        delays = latency(args, db, tmp) if args.only in (None, "latency") else None
        print(report(args, db, rates, delays))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
