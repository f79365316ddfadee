"""Signed transfers per second over HTTP against a running ``ubc serve``.

For each engine (SQLite, PostgreSQL) this starts the real service as a subprocess
(``ubc serve`` under uvicorn on the loopback interface, ``--workers`` passed through) on a
fresh database and a fresh data dir (``ubc init --data-dir``), registers and funds a few
hundred members through ``POST /api/envelopes/batch``, and then measures member-to-member
transfers of 1 CU, each a DSSE envelope signed by its sender with a unique id:

- **single**: ``--clients`` concurrent clients (default 32), each posting one envelope per
  request to ``POST /api/envelopes`` over its own keep-alive connection
  (``--client-processes`` spreads the clients over several processes);
- **batch 100** and **batch 1000**: ``--batch-clients`` concurrent clients (default 2)
  each posting non-atomic batches of 100 or 1,000 envelopes to ``/api/envelopes/batch``.

Every envelope is signed before the clock starts (a process pool on every core) and every
request body is serialized in advance, so the clients only send bytes. A measurement
lasts about ``--seconds``: clients stop sending at the deadline and the time runs until
the last answer. Every single answer must be 201 and every batch result 201; anything else
counts as a failure and is reported. The modes alternate within each of ``--runs`` rounds;
the table shows medians.

In the same run, before and after the engines, the script measures the **verification
ceiling** of this machine: one process per core verifying Ed25519 signatures with PyNaCl
over the PAE of real transfer envelopes for ``--ceiling-seconds``, summed. Every transfer
needs one such verification, so no server on this machine can accept more signed transfers
per second than that. Ratios use the higher of the two measurements.

The clients and the server share the machine's cores, so the clients must cost little:
by default each is a keep-alive connection on asyncio streams (uvloop) writing pre-built
HTTP/1.1 requests and reading status line, headers and ``content-length`` body, about
15 µs of CPU per request. ``--http-client httpx`` uses ``httpx.AsyncClient`` instead,
which costs 1 to 3 ms of CPU per request with 32 connections and then is the bottleneck on
a small machine. Client CPU is reported beside the server's and PostgreSQL's.

    python scripts/bench_envelopes.py --engines sqlite,postgresql --runs 3 --seconds 5

**Comparisons on PostgreSQL, in the same run** (each round, after ubc's modes, against the
same server with the same durable commits): ``pgbench`` with ``--clients`` connections
(prepared statements) drives

- **plain SQL** (always, unless ``--no-plain-sql``): the least a double-entry transfer
  takes, one transaction of two balance ``UPDATE`` statements (in account order) and one
  ``INSERT``, in a scratch database;
- **pgledger** (github.com/pgr0ss/pgledger, a ledger in PostgreSQL functions), with
  ``--pgledger-sql PATH`` given once per file, in load order: pgledger's ``pgledger.sql``
  needs ``uuid_to_ulid``, which its repository vendors from scoville/pgsql-ulid
  (``uuid-to-ulid.sql``), so give that file first. Nothing of pgledger is in this
  repository: fetch the files at run time (for example into ``/var/tmp/pgledger/``; the
  commit measured is in BENCHMARKS.md). It creates ``--members`` accounts with
  ``pgledger_create_account`` and each transaction calls ``pgledger_create_transfer``
  between two random ones (their ids are looked up by number in a side table).

``--hosts N`` (N > 1) measures every mode twice in one run, each time on a fresh
database: on one server, then on N servers, each a ``ubc serve`` of its own on its own
port (as on N hosts; each with ``--workers``) against the same database, the clients
spread evenly over them (client k talks to server k mod N). A scaling line per mode gives
the ratio. The servers of one machine share its cores with each other, the clients and
PostgreSQL: on a small machine the ratio shows the cost of the hosts' coordination (the
journal lock, one more connection pool), not what N machines would add. The comparisons
(pgbench) and wrk run beside the one-server measurement only.

    python scripts/bench_envelopes.py --engines postgresql --runs 3 --seconds 5 --hosts 2

``--cpu-profile N`` measures CPU instead of rates, for a machine shared with other work:
PostgreSQL only, N pre-signed single envelopes sent by ``--clients`` clients in each of
``--runs`` runs (all of them, however long it takes), and the server's CPU (every process)
and PostgreSQL's (the backends of the benchmark's database) per accepted envelope, with the
envelopes per group commit (from ``GET /metrics``), medians:

    python scripts/bench_envelopes.py --cpu-profile 10000 --workers 2 --runs 3

``--wrk`` also sends single envelopes through wrk (one thread, ``--clients`` connections,
a Lua script posting each pre-signed envelope once and counting 201s), to check that the
built-in load generator measures the server, not itself.

    python scripts/bench_envelopes.py --engines sqlite,postgresql --runs 3 --seconds 4 \\
        --workers 2 --wrk --pgledger-sql /var/tmp/pgledger/uuid-to-ulid.sql \\
        --pgledger-sql /var/tmp/pgledger/pgledger.sql
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from _bench import Hosts
from _bench import running_hosts as start_hosts
from nacl.signing import SigningKey, VerifyKey
from sqlalchemy.engine import make_url

from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import sign_payload
from ubc.signing import encode_public_key, generate_signing_key, load_signing_key, pae

try:
    import uvloop
except ImportError:  # uvicorn[standard] brings it; without it the clients use asyncio's loop
    uvloop = None  # type: ignore[assignment]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ORIGIN = "bench.ubc/ledger"
ASSET = "CU"
FUNDING = 10**12  # per member: no benchmark transfer is ever refused for funds
SKEW_SECONDS = 3600  # pre-signed envelopes stay inside the created_at window
TARGET_CEILING = 0.30  # batched PostgreSQL transfers/s over the verification ceiling
TARGET_SINGLE = 1500  # single-envelope transfers/s on PostgreSQL with 32 clients
TARGET_SINGLE_CLIENTS = 32
MAX_BATCH = 1000  # the server's limit per batch request


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _child_signals() -> None:
    # Ctrl-C reaches the whole foreground process group: helpers ignore it and the main
    # process tears everything down in order (clients, server, database). SIGTERM (how
    # the main process stops them) must kill them, not unwind like the main process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- signing (process pool) -----------------------------------------------------------------

_SIGNER_KEYS: list[SigningKey] = []
_SIGNER_HANDLES: list[str] = []


def _init_signer(seeds: list[bytes], handles: list[str]) -> None:
    _child_signals()
    _SIGNER_KEYS[:] = [SigningKey(seed) for seed in seeds]
    _SIGNER_HANDLES[:] = handles


def _sign_transfers(pairs: list[tuple[int, int]]) -> list[bytes]:
    """Envelope JSON bytes of one transfer of 1 CU per (sender, recipient) pair."""
    created_at = format_timestamp(datetime.now(UTC))
    out = []
    for sender, recipient in pairs:
        handle = _SIGNER_HANDLES[sender]
        payload = validate_payload(
            "transfer",
            {
                "ledger": ORIGIN,
                "id": str(uuid.uuid4()),
                "created_at": created_at,
                "actor": f"member:{handle}",
                "from": f"member:{handle}",
                "to": f"member:{_SIGNER_HANDLES[recipient]}",
                "asset": ASSET,
                "amount": 1,
            },
        )
        envelope = sign_payload(payload, "transfer", [_SIGNER_KEYS[sender]])
        out.append(json.dumps(envelope.to_json(), separators=(",", ":")).encode())
    return out


@dataclass
class Members:
    keys: list[SigningKey]
    handles: list[str]

    @classmethod
    def generate(cls, count: int) -> Members:
        return cls(
            [generate_signing_key() for _ in range(count)], [f"m{i:05d}" for i in range(count)]
        )


class Signer:
    """Pre-signs transfers between random pairs of members on every core."""

    def __init__(self, members: Members, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = len(members.keys)
        self.processes = os.cpu_count() or 1
        self.pool: Pool = mp.get_context("fork").Pool(
            self.processes,
            initializer=_init_signer,
            initargs=([bytes(k) for k in members.keys], members.handles),
        )

    def transfers(self, n: int) -> list[bytes]:
        pairs = []
        for _ in range(n):
            sender = self.rng.randrange(self.count)
            recipient = self.rng.randrange(self.count - 1)
            recipient += recipient >= sender  # a random other member
            pairs.append((sender, recipient))
        size = max(100, math.ceil(n / (self.processes * 4)))
        chunks = [pairs[i : i + size] for i in range(0, n, size)]
        return [body for part in self.pool.map(_sign_transfers, chunks) for body in part]

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


# --- the verification ceiling ---------------------------------------------------------------


def _verify_worker(
    items: list[tuple[bytes, bytes, bytes]], start_at: float, end_at: float, out: Any
) -> None:
    _child_signals()
    keys = [(VerifyKey(pk), message, sig) for pk, message, sig in items]
    while time.time() < start_at:
        time.sleep(0.001)
    done = 0
    n = len(keys)
    started = time.time()
    while time.time() < end_at:
        for i in range(64):
            key, message, sig = keys[(done + i) % n]
            key.verify(message, sig)
        done += 64
    out.put(done / (time.time() - started))


@dataclass
class Ceiling:
    processes: int
    seconds: float
    per_process: list[float]
    message_bytes: int

    @property
    def rate(self) -> float:
        return sum(self.per_process)


def verification_ceiling(members: Members, seconds: float) -> Ceiling:
    """Ed25519 verifications per second with one PyNaCl process per core, summed."""
    items = []
    for i in range(64):
        key = members.keys[i % len(members.keys)]
        payload = validate_payload(
            "transfer",
            {
                "ledger": ORIGIN,
                "id": str(uuid.uuid4()),
                "created_at": format_timestamp(datetime.now(UTC)),
                "actor": f"member:{members.handles[i % len(members.handles)]}",
                "from": f"member:{members.handles[i % len(members.handles)]}",
                "to": f"member:{members.handles[(i + 1) % len(members.handles)]}",
                "asset": ASSET,
                "amount": 1,
            },
        )
        envelope = sign_payload(payload, "transfer", [key])
        message = pae(envelope.payload_type, envelope.payload)
        items.append((bytes(key.verify_key), message, envelope.signatures[0].sig))
    processes = os.cpu_count() or 1
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.5
    end_at = start_at + seconds
    workers = [
        ctx.Process(target=_verify_worker, args=(items, start_at, end_at, out))
        for _ in range(processes)
    ]
    try:
        for w in workers:
            w.start()
        rates = [out.get(timeout=seconds + 60) for _ in workers]
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    return Ceiling(
        processes,
        seconds,
        rates,
        sum(len(m) for _, m, _ in items) // len(items),
    )


# --- databases and the server ---------------------------------------------------------------


@dataclass
class Database:
    engine: str
    url: str  # what UBC_DATABASE_URL gets
    server_version: str
    settings: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def fresh_database(engine: str, postgres_url: str, tmp: Path) -> Iterator[Database]:
    if engine == "sqlite":
        yield Database(
            engine,
            f"sqlite:///{tmp / 'bench.db'}",
            sqlite3.sqlite_version,
            {"journal_mode": "WAL", "synchronous": "FULL"},
        )
        return
    admin = make_url(postgres_url).set(drivername="postgresql")
    admin_conninfo = admin.render_as_string(hide_password=False)
    name = f"ubc_bench_envelopes_{os.getpid()}"
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        conninfo = admin.set(database=name).render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            shown = {
                s: _show(conn, s)
                for s in (
                    "server_version",
                    "synchronous_commit",
                    "fsync",
                    "wal_sync_method",
                    "commit_delay",
                    "max_connections",
                )
            }
        server_version = shown.pop("server_version")
        url = admin.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
        yield Database(engine, url, server_version, shown)
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _show(conn: psycopg.Connection[tuple[object, ...]], setting: str) -> str:
    row = conn.execute(f"SHOW {setting}").fetchone()
    assert row is not None
    return str(row[0])


def ubc_command() -> list[str]:
    beside = Path(sys.executable).with_name("ubc")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ubc")
    if found:
        return [found]
    return [sys.executable, "-c", "from ubc.cli import main; main()"]


def server_env(db: Database, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UBC_")}
    env.update(
        UBC_DATABASE_URL=db.url,
        UBC_DATA_DIR=str(data_dir),
        UBC_ORIGIN=ORIGIN,
        UBC_ENROLLMENT="open",
        UBC_CREATED_AT_SKEW_SECONDS=str(SKEW_SECONDS),
    )
    return env


def ubc_init(db: Database, data_dir: Path) -> None:
    subprocess.run(
        [*ubc_command(), "init", "--data-dir", str(data_dir)],
        env=server_env(db, data_dir),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def cpu(self) -> dict[int, float]:
        """CPU seconds so far of the server and each of its worker processes, by pid."""
        try:
            root = psutil.Process(self.process.pid)
            return _cpu_by_pid([root, *root.children(recursive=True)])
        except psutil.Error:
            return {}


def _cpu_by_pid(processes: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots (processes that exited in between are lost)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


@contextlib.contextmanager
def running_server(db: Database, data_dir: Path, workers: int, log_path: Path) -> Iterator[Server]:
    port = _free_port()
    command = [
        *ubc_command(),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    with log_path.open("wb") as out:
        # Its own session: Ctrl-C does not reach it half-way, and the whole group (uvicorn's
        # supervisor and its workers) is stopped below, whatever happens here.
        process = subprocess.Popen(
            command,
            env=server_env(db, data_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server)
        yield server
    except Exception:
        log(f"the server's log ends with:\n{log_path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        stop_server(process)


@contextlib.contextmanager
def running_hosts(
    db: Database, data_dir: Path, workers: int, hosts: int, tmp: Path
) -> Iterator[Hosts[Server]]:
    """``hosts`` servers on ``db`` (see ``_bench.running_hosts``): set-up, reads and wrk use
    the first; ubc's clients spread over all."""

    def start(i: int) -> contextlib.AbstractContextManager[Server]:
        return running_server(db, data_dir, workers, tmp / f"server-{i + 1}.log")

    with start_hosts(start, hosts) as servers:
        yield servers


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    # Anything left in the group (a worker that outlived its supervisor) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


# --- setting up members ---------------------------------------------------------------------


def _envelope(type_: str, keys: list[SigningKey], **fields: Any) -> dict[str, Any]:
    payload = validate_payload(
        type_,
        {
            "ledger": ORIGIN,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(datetime.now(UTC)),
            **fields,
        },
    )
    return sign_payload(payload, type_, keys).to_json()


def _post_all_201(client: httpx.Client, envelopes: list[dict[str, Any]], what: str) -> None:
    for start in range(0, len(envelopes), MAX_BATCH):
        chunk = envelopes[start : start + MAX_BATCH]
        response = client.post("/api/envelopes/batch", json={"atomic": True, "envelopes": chunk})
        if response.status_code != 200:
            raise RuntimeError(f"{what}: HTTP {response.status_code} {response.text[:500]}")
        bad = [r for r in response.json()["results"] if r["status"] != 201]
        if bad:
            raise RuntimeError(f"{what}: {len(bad)} refused, first {bad[0]}")


def set_up_members(server: Server | Hosts[Server], data_dir: Path, members: Members) -> int:
    """Register and fund every member; return the journal size afterwards."""
    operator = load_signing_key(data_dir / "operator.key")
    with httpx.Client(base_url=server.url, timeout=120) as client:
        _post_all_201(
            client,
            [
                _envelope(
                    "member.register",
                    [key],
                    actor=f"member:{handle}",
                    handle=handle,
                    public_key=encode_public_key(bytes(key.verify_key)),
                )
                for key, handle in zip(members.keys, members.handles, strict=True)
            ],
            "member.register",
        )
        _post_all_201(
            client,
            [
                _envelope(
                    "deposit",
                    [operator],
                    actor="operator",
                    to=f"member:{handle}",
                    asset=ASSET,
                    amount=FUNDING,
                    external_ref=f"bench-{handle}",
                )
                for handle in members.handles
            ],
            "deposit",
        )
        return journal_size(client)


def journal_size(client: httpx.Client) -> int:
    response = client.get("/journal/checkpoint")
    response.raise_for_status()
    return int(response.text.splitlines()[1])


# --- clients --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    batch: int  # envelopes per request; 0 for single envelopes on /api/envelopes
    clients: int
    # Not ubc: one of the comparisons driven by pgbench (``Comparison.name``), or the
    # external load generator (wrk) on single envelopes.
    external: str = ""

    @property
    def per_request(self) -> int:
        return self.batch or 1

    @property
    def path(self) -> str:
        return "/api/envelopes/batch" if self.batch else "/api/envelopes"


def request_bodies(mode: Mode, envelopes: list[bytes]) -> list[bytes]:
    if not mode.batch:
        return envelopes
    return [
        b'{"atomic":false,"envelopes":[' + b",".join(envelopes[i : i + mode.batch]) + b"]}"
        for i in range(0, len(envelopes), mode.batch)
    ]


def raw_requests(url: str, mode: Mode, bodies: list[bytes]) -> list[bytes]:
    """Whole HTTP/1.1 requests (keep-alive is HTTP/1.1's default), ready to write."""
    host = url.removeprefix("http://")
    head = (
        f"POST {mode.path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        "content-length: %d\r\n\r\n"
    ).encode()
    return [head % len(body) + body for body in bodies]


class _Answers:
    """What the clients got; parsed only after the clock stops."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.items: list[tuple[int, bytes]] = []  # (status or -1 for no answer, body kept)
        self.errors: list[str] = []

    def add(self, status: int, content: bytes) -> None:
        keep = self.mode.batch or status != 201
        self.items.append((status, content if keep else b""))

    def lost(self, exc: BaseException) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        self.items.append((-1, b""))

    def count(self) -> tuple[int, int]:
        ok = failed = 0
        for status, content in self.items:
            if not self.mode.batch or status != 200:
                good = status == 201 and not self.mode.batch
                ok += good
                failed += 0 if good else self.mode.per_request
                if not good and status != -1 and len(self.errors) < 20:
                    self.errors.append(f"HTTP {status}: {content[:300]!r}")
                continue
            for result in json.loads(content)["results"]:
                if result["status"] == 201:
                    ok += 1
                else:
                    failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(f"result {result['status']}: {json.dumps(result)[:300]}")
        return ok, failed


async def _raw_connection(
    host: str, port: int, pending: Iterator[bytes], end_at: float, answers: _Answers
) -> None:
    """One keep-alive connection sending pre-built requests, one at a time."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        for request in pending:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    raise RuntimeError("chunked responses are not supported by this client")
                at = lower.index(b"\r\ncontent-length:") + 17
                content = await reader.readexactly(int(head[at : head.index(b"\r\n", at)]))
                answers.add(status, content)
                if b"\r\nconnection: close" in lower:
                    writer.close()
                    reader = writer = None
            except (OSError, ValueError, RuntimeError, asyncio.IncompleteReadError) as exc:
                answers.lost(exc)
                if writer is not None:
                    writer.close()
                reader = writer = None
            if time.time() >= end_at:
                return
    finally:
        if writer is not None:
            writer.close()


async def _drive(
    urls: list[str],
    mode: Mode,
    requests: list[bytes],
    clients: int,
    http_client: str,
    start_at: float,
    end_at: float,
) -> dict[str, Any]:
    answers = _Answers(mode)
    # The iterator is shared: each request is sent once, by whichever client is free.
    pending = iter(requests)
    # Client k talks to host k mod len(urls): the clients spread evenly over the hosts.
    if http_client == "raw":
        addresses = [url.removeprefix("http://").rsplit(":", 1) for url in urls]
        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu_start, started = time.process_time(), time.time()
        await asyncio.gather(
            *(
                _raw_connection(host, int(port), pending, end_at, answers)
                for host, port in (addresses[k % len(addresses)] for k in range(clients))
            )
        )
        ended, cpu = time.time(), time.process_time() - cpu_start
    else:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with contextlib.AsyncExitStack() as stack:
            http = [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=url,
                        limits=limits,
                        timeout=httpx.Timeout(300.0),
                        headers={"content-type": "application/json"},
                    )
                )
                for url in urls
            ]

            async def one_client(k: int) -> None:
                client = http[k % len(http)]
                for body in pending:
                    try:
                        response = await client.post(mode.path, content=body)
                    except httpx.HTTPError as exc:
                        answers.lost(exc)
                    else:
                        answers.add(response.status_code, response.content)
                    if time.time() >= end_at:
                        return

            delay = start_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            cpu_start, started = time.process_time(), time.time()
            await asyncio.gather(*(one_client(k) for k in range(clients)))
            ended, cpu = time.time(), time.process_time() - cpu_start
    ok, failed = answers.count()
    return {
        "ok": ok,
        "failed": failed,
        "requests": len(answers.items),
        "started": started,
        "ended": ended,
        "cpu": cpu,
        "errors": answers.errors[:20],
    }


def _client_process(
    urls: list[str],
    mode: Mode,
    requests: list[bytes],
    clients: int,
    http_client: str,
    start_at: float,
    end_at: float,
    out: Any,
) -> None:
    _child_signals()
    try:
        drive = _drive(urls, mode, requests, clients, http_client, start_at, end_at)
        if uvloop is not None:
            result = uvloop.run(drive)
        else:
            result = asyncio.run(drive)
        out.put(result)
    except BaseException as exc:  # report it rather than leave the parent waiting
        out.put({"crash": f"{type(exc).__name__}: {exc}"})


@dataclass
class Measurement:
    ok: int
    failed: int
    seconds: float
    client_cpu: float
    server_cpu: float
    postgres_cpu: float
    machine_cpu: float
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every local ``postgres`` process (all databases, not only this one)."""
    return _cpu_by_pid([p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"])


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def measure(
    server: Hosts[Server], mode: Mode, envelopes: list[bytes], clients: Clients, seconds: float
) -> Measurement:
    """Send ``envelopes`` for at most ``seconds`` and count what was accepted."""
    requests = request_bodies(mode, envelopes)
    if clients.kind == "raw":
        requests = raw_requests(server.url, mode, requests)
    client_processes = clients.processes
    procs = max(1, min(client_processes, mode.clients))
    shares = [mode.clients // procs + (i < mode.clients % procs) for i in range(procs)]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.3 + 0.05 * procs
    end_at = start_at + seconds
    workers = [
        ctx.Process(
            target=_client_process,
            args=(
                server.urls,
                mode,
                requests[i::procs],
                shares[i],
                clients.kind,
                start_at,
                end_at,
                out,
            ),
        )
        for i in range(procs)
    ]
    try:
        for w in workers:
            w.start()
        while time.time() < start_at:
            time.sleep(0.001)
        server_before, pg_before, busy = server.cpu(), postgres_cpu(), machine_busy_seconds()
        results = [out.get(timeout=seconds + 600) for _ in workers]
        server_cpu = _cpu_used(server_before, server.cpu())
        pg_cpu = _cpu_used(pg_before, postgres_cpu())
        busy = machine_busy_seconds() - busy
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    crashed = [r["crash"] for r in results if "crash" in r]
    if crashed:
        raise RuntimeError(f"a client process failed: {crashed[0]}")
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return Measurement(
        ok=sum(r["ok"] for r in results),
        failed=sum(r["failed"] for r in results),
        seconds=elapsed,
        client_cpu=sum(r["cpu"] for r in results) / elapsed,
        # What the others did between the clock's start and the clients' last answer
        # (the processes are sampled from here, so the window is a little longer).
        server_cpu=server_cpu / elapsed,
        postgres_cpu=pg_cpu / elapsed,
        machine_cpu=busy / elapsed,
        errors=[e for r in results for e in r["errors"]][:5],
    )


# --- pgledger and plain SQL through pgbench, and wrk ----------------------------------------

# Plain SQL: the least a durable double-entry transfer takes (two balance updates in a
# fixed order, so that concurrent transfers never deadlock, and one insert), one
# transaction per transfer.
PLAIN_SETUP = """
CREATE TABLE plain_accounts (id integer PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE plain_transfers (
    id bigserial PRIMARY KEY,
    debit_account integer NOT NULL,
    credit_account integer NOT NULL,
    amount bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO plain_accounts SELECT n, 0 FROM generate_series(1, {members}) AS n;
"""
_PAIR = """\\set a random(1, {members})
\\set k random(1, {others})
\\set b (:a + :k - 1) % {members} + 1
"""
PLAIN_SCRIPT = (
    _PAIR
    + """\\set lo least(:a, :b)
\\set hi greatest(:a, :b)
\\if :a < :b
\\set dlo -1
\\set dhi 1
\\else
\\set dlo 1
\\set dhi -1
\\endif
BEGIN;
UPDATE plain_accounts SET balance = balance + :dlo WHERE id = :lo;
UPDATE plain_accounts SET balance = balance + :dhi WHERE id = :hi;
INSERT INTO plain_transfers (debit_account, credit_account, amount) VALUES (:a, :b, 1);
END;
"""
)
# pgledger: its accounts are made by its own function; their generated ids are kept in a
# side table so that pgbench can pick two at random by number.
PGLEDGER_SETUP = """
CREATE TABLE bench_accounts (n integer PRIMARY KEY, id text NOT NULL);
INSERT INTO bench_accounts
SELECT n, (SELECT id FROM pgledger_create_account('m' || n, 'CU'))
FROM generate_series(1, {members}) AS n;
"""
PGLEDGER_SCRIPT = (
    _PAIR
    + """SELECT id FROM pgledger_create_transfer(
    (SELECT id FROM bench_accounts WHERE n = :a),
    (SELECT id FROM bench_accounts WHERE n = :b),
    1);
"""
)


@dataclass
class Comparison:
    """A ledger in SQL in its own scratch database, driven by ``pgbench``."""

    name: str
    conninfo: str
    script: Path


def _psql(conninfo: str, *args: str) -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo, *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def comparison_databases(
    postgres_url: str, tmp: Path, pgledger_sql: list[Path], members: int
) -> Iterator[list[Comparison]]:
    """Plain SQL and (with ``pgledger_sql``, its SQL files in load order) pgledger, each
    in a fresh database on the same server, dropped afterwards."""
    admin = make_url(postgres_url).set(drivername="postgresql")
    admin_conninfo = admin.render_as_string(hide_password=False)
    wanted = [("plain SQL", "plain")] + ([("pgledger", "pgledger")] if pgledger_sql else [])
    names = [f"ubc_bench_{key}_{os.getpid()}" for _, key in wanted]
    try:
        comparisons = []
        for (title, key), name in zip(wanted, names, strict=True):
            with psycopg.connect(admin_conninfo, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
            conninfo = admin.set(database=name).render_as_string(hide_password=False)
            script = tmp / f"{key}.pgbench"
            others = members - 1
            if key == "plain":
                _psql(conninfo, "-c", PLAIN_SETUP.format(members=members))
                script.write_text(PLAIN_SCRIPT.format(members=members, others=others))
            else:
                _psql(conninfo, *[a for path in pgledger_sql for a in ("-f", str(path))])
                _psql(conninfo, "-c", PGLEDGER_SETUP.format(members=members))
                script.write_text(PGLEDGER_SCRIPT.format(members=members, others=others))
            comparisons.append(Comparison(title, conninfo, script))
        yield comparisons
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_pgbench(comparison: Comparison, clients: int, seconds: float) -> Measurement:
    """One ``pgbench`` run of ``clients`` connections (prepared statements, 2 threads)."""
    command = [
        "pgbench",
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, os.cpu_count() or 1)),
        "-T",
        str(max(1, round(seconds))),
        "-f",
        str(comparison.script),
        comparison.conninfo,  # the database argument takes a connection string
    ]
    children = os.times()
    started = time.monotonic()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        # PostgreSQL's CPU is sampled while pgbench's connections live (a backend that has
        # exited is not counted), from 0.5 s in to 0.3 s before the end.
        length = max(1, round(seconds))
        time.sleep(min(0.5, length / 4))
        window = time.monotonic()
        pg_before, busy = postgres_cpu(), machine_busy_seconds()
        time.sleep(max(0.1, length - (window - started) - 0.3))
        pg_cpu = _cpu_used(pg_before, postgres_cpu())
        busy = machine_busy_seconds() - busy
        window = time.monotonic() - window
        stdout, stderr = process.communicate()
    elapsed = time.monotonic() - started
    after = os.times()
    client_cpu = (after.children_user - children.children_user) + (
        after.children_system - children.children_system
    )
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed ({comparison.name}): {done.stderr[-2000:]}")
    values = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
        if line.startswith("tps = "):
            values["tps"] = line.split()[2]
    processed = int(values["number of transactions actually processed"].split("/")[0])
    failed = int(values.get("number of failed transactions", "0").split()[0])
    tps = float(values["tps"])
    # pgbench's tps excludes connecting; the transactions are spread over its -T seconds.
    duration = processed / tps if tps else elapsed
    return Measurement(
        ok=processed,
        failed=failed,
        seconds=duration,
        client_cpu=client_cpu / elapsed,
        server_cpu=0.0,
        postgres_cpu=pg_cpu / window,
        machine_cpu=busy / window,
        errors=[done.stderr.strip()[-300:]] if failed else [],
    )


WRK_SCRIPT = """
-- Posts pre-signed envelopes, one per request, each once (a file of one JSON per line);
-- counts 201 (accepted) and anything else apart.
local bodies = {}
for line in io.lines(os.getenv("UBC_BENCH_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
created, other = 0, 0
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function request()
  i = i + 1
  if i > #bodies then i = 1 end -- out of envelopes: repeats answer 200 and count as other
  return wrk.format(nil, "/api/envelopes", nil, bodies[i])
end
function response(status, headers, body)
  if status == 201 then created = created + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local c, o = 0, 0
  for _, t in ipairs(threads) do c = c + t:get("created"); o = o + t:get("other") end
  io.write(string.format("UBC created=%d other=%d duration_us=%d\\n", c, o, summary.duration))
end
"""


def run_wrk(
    server: Server | Hosts[Server], envelopes: list[bytes], clients: int, seconds: float, tmp: Path
) -> Measurement:
    """Single envelopes through ``wrk`` (one thread, ``clients`` connections, a Lua script
    posting each pre-signed envelope once): the external check of the load generator."""
    bodies = tmp / "wrk-bodies.jsonl"
    bodies.write_bytes(b"\n".join(envelopes) + b"\n")
    script = tmp / "envelopes.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "UBC_BENCH_BODIES": str(bodies)}
    command = ["wrk", "-t", "1", "-c", str(clients), "-d", f"{max(1, round(seconds))}s"]
    command += ["-s", str(script), server.url]
    children = os.times()
    server_before, pg_before, busy = server.cpu(), postgres_cpu(), machine_busy_seconds()
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - started
    server_cpu = _cpu_used(server_before, server.cpu())
    pg_cpu = _cpu_used(pg_before, postgres_cpu())
    busy = machine_busy_seconds() - busy
    after = os.times()
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr[-2000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("UBC "))
    fields = dict(item.split("=") for item in line.split()[1:])
    created, other = int(fields["created"]), int(fields["other"])
    duration = int(fields["duration_us"]) / 1e6
    client_cpu = (after.children_user - children.children_user) + (
        after.children_system - children.children_system
    )
    return Measurement(
        ok=created,
        failed=other,
        seconds=duration,
        client_cpu=client_cpu / elapsed,
        server_cpu=server_cpu / elapsed,
        postgres_cpu=pg_cpu / elapsed,
        machine_cpu=busy / elapsed,
        errors=[f"{other} answers other than 201 (repeats if wrk ran out of envelopes)"]
        if other
        else [],
    )


# --- one engine -----------------------------------------------------------------------------


@dataclass
class Row:
    engine: str
    mode: Mode
    hosts: int = 1
    runs: list[Measurement] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [m.rate for m in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def failed(self) -> int:
        return sum(m.failed for m in self.runs)

    def median_of(self, attribute: str) -> float:
        return float(statistics.median(getattr(m, attribute) for m in self.runs))


@dataclass(frozen=True)
class Clients:
    kind: str  # "raw": pre-built HTTP/1.1 requests on asyncio streams; or "httpx"
    processes: int


@dataclass
class Options:
    runs: int
    seconds: float
    workers: int
    clients: Clients
    max_envelopes: int
    # PostgreSQL only: the ledgers in SQL run by pgbench in each round
    comparisons: list[Comparison] = field(default_factory=list)
    wrk: bool = False  # single envelopes through wrk too, in each round


def envelopes_for(mode: Mode, rate: float, seconds: float, limit: int) -> int:
    """Enough envelopes to last ``seconds`` at 1.5 times ``rate``, whole requests."""
    per_round = mode.per_request * mode.clients
    wanted = max(rate * seconds * 1.5, per_round * 4)
    return min(limit, math.ceil(wanted / per_round) * per_round)


def bench_engine(
    db: Database,
    modes: list[Mode],
    members: Members,
    signer: Signer,
    opts: Options,
    tmp: Path,
    hosts: int = 1,
) -> list[Row]:
    data_dir = tmp / "data"
    ubc_init(db, data_dir)
    single = next((m for m in modes if not m.batch), None)
    if opts.wrk and single is not None and hosts == 1:
        modes = [*modes, Mode("single (wrk)", 0, single.clients, external="wrk")]
    # The comparisons run once, beside the one-host measurement (they use no ubc server).
    comparisons = opts.comparisons if db.engine == "postgresql" and hosts == 1 else []
    clients = single.clients if single is not None else TARGET_SINGLE_CLIENTS
    modes = [*modes, *(Mode(f"{c.name} (pgbench)", 0, clients, c.name) for c in comparisons)]
    by_name = {c.name: c for c in comparisons}
    rows = [Row(db.engine, mode, hosts) for mode in modes]

    def measure_mode(mode: Mode, n: int, seconds: float) -> Measurement:
        if mode.external == "wrk":
            return run_wrk(server, signer.transfers(n), mode.clients, seconds, tmp)
        if mode.external:
            return run_pgbench(by_name[mode.external], mode.clients, seconds)
        return measure(server, mode, signer.transfers(n), opts.clients, seconds)

    with running_hosts(db, data_dir, opts.workers, hosts, tmp) as server:
        log(
            f"  {hosts} server(s) up at {', '.join(server.urls)} (workers {opts.workers} each); "
            "setting up members"
        )
        size = set_up_members(server, data_dir, members)
        accepted = in_flight = 0
        # Warm up each mode (connections, statement caches, buffer pool) and estimate its
        # rate, so that each run gets enough pre-signed envelopes to last --seconds.
        estimate: dict[Mode, float] = {}
        for mode in modes:
            n = envelopes_for(mode, 2000, min(opts.seconds, 2), opts.max_envelopes)
            warm = measure_mode(mode, n, min(opts.seconds, 2))
            if not mode.external or mode.external == "wrk":
                accepted += warm.ok
            if mode.external == "wrk":
                in_flight += mode.clients
            estimate[mode] = warm.rate
            log(f"  {db.engine:<10} {mode.name:<10} hosts {hosts} warm-up {warm.rate:9.0f}/s")
            _check_failures(warm)
        for run in range(opts.runs):
            for row in rows:
                mode = row.mode
                n = envelopes_for(mode, estimate[mode], opts.seconds, opts.max_envelopes)
                m = measure_mode(mode, n, opts.seconds)
                if not mode.external or mode.external == "wrk":
                    accepted += m.ok
                if mode.external == "wrk":
                    in_flight += mode.clients
                estimate[mode] = max(estimate[mode], m.rate)
                row.runs.append(m)
                log(
                    f"  {db.engine:<10} {mode.name:<10} hosts {hosts} run {run + 1}"
                    f"  {m.rate:9.0f}/s"
                    f"  ({m.ok} in {m.seconds:.1f} s, {m.failed} failed; CPU cores: server "
                    f"{m.server_cpu:.2f}, client {m.client_cpu:.2f}, postgres "
                    f"{m.postgres_cpu:.2f}, machine {m.machine_cpu:.2f})"
                )
                _check_failures(m)
                if not mode.external and m.ok + m.failed == n and m.seconds < 0.9 * opts.seconds:
                    log("    (ran out of pre-signed envelopes before --seconds; rate still valid)")
        with httpx.Client(base_url=server.url, timeout=30) as client:
            grown = journal_size(client) - size
        # wrk stops counting at its deadline: what its connections had in flight then was
        # applied too (at most one request per connection), so the journal may hold more.
        if not accepted <= grown <= accepted + in_flight:
            raise RuntimeError(
                f"the journal grew by {grown} entries but {accepted} transfers were accepted"
                + (f" (and up to {in_flight} in flight when wrk stopped)" if in_flight else "")
            )
        if in_flight:
            log(f"  journal: {grown - accepted} applied after wrk stopped counting (≤ {in_flight})")
    return rows


def database_backends_cpu(conninfo: str, database: str) -> dict[int, float]:
    """CPU seconds so far of the PostgreSQL backends connected to ``database`` (not the
    other databases of a shared server, nor its background processes)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        pids = [
            int(row[0])
            for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
        ]
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            processes.append(psutil.Process(pid))
    return _cpu_by_pid(processes)


def group_commits(url: str) -> tuple[float, float]:
    """Group commits of the envelope writer so far and the envelopes they applied, every
    worker's (``GET /metrics``, open on the loopback interface)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    found = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for kind in found:
            if line.startswith(f'ubc_writer_batch_size_{kind}{{writer="envelopes"}}'):
                found[kind] = float(line.rsplit(" ", 1)[1])
    return found["count"], found["sum"]


@dataclass
class CpuRun:
    accepted: int
    failed: int
    seconds: float
    server_cpu: float  # CPU seconds, every server process
    postgres_cpu: float  # CPU seconds, the backends of the benchmark's database
    client_cpu: float  # CPU seconds
    commits: float  # group commits of the envelope writer
    committed: float  # envelopes they applied

    @property
    def per_commit(self) -> float:
        return self.committed / self.commits if self.commits else 0.0


def cpu_profile(
    db: Database,
    members: Members,
    signer: Signer,
    opts: Options,
    tmp: Path,
    count: int,
    clients: int,
) -> list[CpuRun]:
    """Server and PostgreSQL CPU per accepted single envelope: ``count`` pre-signed
    transfers sent by ``opts`` clients, all of them whatever it takes, ``opts.runs``
    times. CPU seconds are robust to other work on the machine, where rates are not."""
    data_dir = tmp / "data"
    ubc_init(db, data_dir)
    mode = Mode("single", 0, clients)
    url = make_url(db.url)
    database = str(url.database)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    runs: list[CpuRun] = []
    # One host (``measure`` takes the clients' servers as ``Hosts``).
    with running_hosts(db, data_dir, opts.workers, 1, tmp) as server:
        log(f"  server up at {server.url} (workers {opts.workers}); setting up members")
        set_up_members(server, data_dir, members)
        warm = measure(server, mode, signer.transfers(2000), opts.clients, 600)
        log(f"  warm-up: {warm.ok} accepted, {warm.failed} failed")
        _check_failures(warm)
        for run in range(opts.runs):
            envelopes = signer.transfers(count)
            commits_before = group_commits(server.url)
            server_before = server.cpu()
            pg_before = database_backends_cpu(conninfo, database)
            m = measure(server, mode, envelopes, opts.clients, 600)
            server_cpu = _cpu_used(server_before, server.cpu())
            pg_after = database_backends_cpu(conninfo, database)
            commits_after = group_commits(server.url)
            # Backends that appeared during the run count from zero; gone ones are lost.
            pg_cpu = _cpu_used(pg_before, pg_after)
            _check_failures(m)
            r = CpuRun(
                m.ok,
                m.failed,
                m.seconds,
                server_cpu,
                pg_cpu,
                m.client_cpu * m.seconds,
                commits_after[0] - commits_before[0],
                commits_after[1] - commits_before[1],
            )
            runs.append(r)
            log(
                f"  run {run + 1}: {r.accepted} accepted ({r.failed} failed) in {r.seconds:.1f} s;"
                f" per envelope: server {1e6 * r.server_cpu / r.accepted:.0f} µs, postgres "
                f"{1e6 * r.postgres_cpu / r.accepted:.0f} µs, client "
                f"{1e6 * r.client_cpu / r.accepted:.0f} µs; {r.per_commit:.1f} envelopes per "
                "group commit"
            )
    return runs


def cpu_profile_report(runs: list[CpuRun], workers: int, clients: int, count: int) -> str:
    def median(values: list[float]) -> float:
        return float(statistics.median(values))

    per = {
        "server": [1e6 * r.server_cpu / r.accepted for r in runs],
        "postgres": [1e6 * r.postgres_cpu / r.accepted for r in runs],
        "client": [1e6 * r.client_cpu / r.accepted for r in runs],
    }
    lines = [
        f"CPU per accepted single envelope, PostgreSQL, `ubc serve --workers {workers}`, "
        f"{clients} clients, {count} envelopes per run, median of {len(runs)}:",
        "",
        "| per envelope | median | runs |",
        "|---|---:|---|",
    ]
    for name, values in per.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {name} CPU (µs) | {median(values):.0f} | {shown} |")
    sizes = [r.per_commit for r in runs]
    shown = ", ".join(f"{v:.1f}" for v in sizes)
    lines.append(f"| envelopes per group commit | {median(sizes):.1f} | {shown} |")
    rates = ", ".join(f"{r.accepted / r.seconds:.0f}" for r in runs)
    lines.append(f"| (transfers/s, contention-sensitive) | — | {rates} |")
    return "\n".join(lines)


def _check_failures(m: Measurement) -> None:
    if m.failed:
        log(f"    {m.failed} failed; first errors:")
        for e in m.errors:
            log(f"      {e}")


# --- reporting ------------------------------------------------------------------------------


def target(row: Row, ceiling: float, pgledger_best: float | None = None) -> str:
    if row.engine != "postgresql" or row.mode.external:
        return "—"
    if row.mode.batch:
        ok = row.median / ceiling >= TARGET_CEILING
        return f"≥ {TARGET_CEILING:.0%} of ceiling: {'yes' if ok else 'no'}"
    if row.mode.clients == TARGET_SINGLE_CLIENTS:
        answer = f"≥ {TARGET_SINGLE:,}/s: {'yes' if row.median >= TARGET_SINGLE else 'no'}"
        if pgledger_best is not None:
            ok = row.median >= pgledger_best
            answer += f"; ≥ pgledger's best ({pgledger_best:,.0f}/s): {'yes' if ok else 'no'}"
        return answer
    return f"(target is for {TARGET_SINGLE_CLIENTS} clients)"


def table(rows: list[Row], ceilings: list[Ceiling]) -> str:
    ceiling = max(c.rate for c in ceilings)
    pgledger = [max(r.rates) for r in rows if r.mode.external == "pgledger" and r.runs]
    pgledger_best = max(pgledger) if pgledger else None
    lines = [
        "| engine | hosts | mode | clients | transfers/s (median) | runs (min–max) | failed "
        "| ratio to ceiling | target | CPU cores server / client / postgres / machine |",
        "|---|---:|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.engine} | {r.hosts} | {r.mode.name} | {r.mode.clients} | {r.median:,.0f} "
            f"| {len(r.runs)} ({min(r.rates):,.0f}–{max(r.rates):,.0f}) | {r.failed} "
            f"| {r.median / ceiling:.1%} | {target(r, ceiling, pgledger_best)} "
            f"| {r.median_of('server_cpu'):.2f} / {r.median_of('client_cpu'):.2f} / "
            f"{r.median_of('postgres_cpu'):.2f} / {r.median_of('machine_cpu'):.2f} |"
        )
    lines.append(
        f"| this machine | — | Ed25519 verification ceiling | {ceilings[0].processes} processes "
        f"| {ceiling:,.0f} | {len(ceilings)} ({' and '.join(f'{c.rate:,.0f}' for c in ceilings)}) "
        "| — | 100% | — | — |"
    )
    return "\n".join(lines)


def scaling(rows: list[Row]) -> str:
    """Each mode's median on N hosts over its median on one host, per engine."""
    one = {(r.engine, r.mode.name): r.median for r in rows if r.hosts == 1 and r.runs}
    lines = []
    for r in rows:
        base = one.get((r.engine, r.mode.name))
        if r.hosts > 1 and r.runs and base:
            lines.append(
                f"- scaling, {r.engine} {r.mode.name}: {r.hosts} hosts {r.median:,.0f}/s over "
                f"1 host {base:,.0f}/s = {r.median / base:.2f}x"
            )
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="rounds of every mode (median)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--workers", type=int, default=1, help="ubc serve --workers")
    parser.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="N > 1: measure every mode on one server and then on N servers (separate "
        "`ubc serve` processes on their own ports, one database), the clients spread over them",
    )
    parser.add_argument("--clients", type=int, default=32, help="clients of single envelopes")
    parser.add_argument("--batch-clients", type=int, default=2, help="clients of batches")
    parser.add_argument("--batches", default="100,1000", help="envelopes per batch request")
    parser.add_argument(
        "--client-processes", type=int, default=1, help="client processes (clients split)"
    )
    parser.add_argument(
        "--http-client",
        choices=("raw", "httpx"),
        default="raw",
        help="raw: pre-built HTTP/1.1 requests on asyncio streams (default); httpx.AsyncClient",
    )
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--ceiling-seconds", type=float, default=2.0)
    parser.add_argument(
        "--max-envelopes", type=int, default=400_000, help="pre-signed envelopes per run, cap"
    )
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--markdown", action="store_true", help="print only the table")
    parser.add_argument(
        "--pgledger-sql",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="pgledger's SQL, loaded in order into a scratch database (give uuid-to-ulid.sql "
        "first, then pgledger.sql): pgledger is then run by pgbench in each PostgreSQL round",
    )
    parser.add_argument(
        "--no-plain-sql",
        action="store_true",
        help="skip plain SQL through pgbench (run by default in each PostgreSQL round)",
    )
    parser.add_argument(
        "--wrk", action="store_true", help="single envelopes through wrk too (external check)"
    )
    parser.add_argument(
        "--cpu-profile",
        type=int,
        default=0,
        metavar="N",
        help="instead of rates: send N pre-signed single envelopes on PostgreSQL (--clients "
        "clients) in each of --runs runs and report the server's and PostgreSQL's CPU per "
        "accepted envelope (robust to other work on the machine)",
    )
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine not in ("sqlite", "postgresql"):
            parser.error(f"unknown engine {engine!r}: choose from sqlite, postgresql")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if any(not 1 <= b <= MAX_BATCH for b in batches):
        parser.error(f"batch sizes must be 1 to {MAX_BATCH}")
    if args.hosts < 1:
        parser.error("--hosts must be at least 1")
    if args.members < 2:
        parser.error("need at least 2 members")
    modes = [Mode("single", 0, args.clients)]
    modes += [Mode(f"batch {b:,}", b, args.batch_clients) for b in batches]
    for path in args.pgledger_sql:
        if not path.is_file():
            parser.error(f"--pgledger-sql {path}: no such file")
    for tool, wanted in (
        ("pgbench", "postgresql" in engines and not args.no_plain_sql or args.pgledger_sql),
        ("psql", "postgresql" in engines and not args.no_plain_sql or args.pgledger_sql),
        ("wrk", args.wrk),
    ):
        if wanted and shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    opts = Options(
        args.runs,
        args.seconds,
        args.workers,
        Clients(args.http_client, args.client_processes),
        args.max_envelopes,
        wrk=args.wrk,
    )

    # Ctrl-C (even if the shell started us ignoring it) and SIGTERM unwind the same way:
    # client processes and the server stopped, the PostgreSQL database dropped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.cpu_profile:
        return _cpu_profile_main(args, opts)
    started = datetime.now(UTC)
    load_before = loadavg()
    members = Members.generate(args.members)
    log(f"verification ceiling: {os.cpu_count()} processes for {args.ceiling_seconds:g} s")
    ceilings = [verification_ceiling(members, args.ceiling_seconds)]
    log(f"  {ceilings[0].rate:,.0f} verifications/s")
    rows: list[Row] = []
    versions: dict[str, str] = {}
    settings: dict[str, dict[str, str]] = {}
    signer = Signer(members, args.seed)
    try:
        for engine, hosts in [(e, h) for e in engines for h in sorted({1, args.hosts})]:
            log(f"{engine}, {hosts} host(s): fresh database and data dir, {args.members} members")
            with contextlib.ExitStack() as stack:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ubc-bench-")))
                db = stack.enter_context(fresh_database(engine, args.postgres_url, tmp))
                comparing = hosts == 1 and (args.pgledger_sql or not args.no_plain_sql)
                if engine == "postgresql" and comparing:
                    log("  plain SQL" + (" and pgledger" if args.pgledger_sql else ""))
                    opts.comparisons = stack.enter_context(
                        comparison_databases(
                            args.postgres_url, tmp, args.pgledger_sql, args.members
                        )
                    )
                    if args.no_plain_sql:
                        opts.comparisons = [c for c in opts.comparisons if c.name != "plain SQL"]
                versions[engine] = db.server_version
                settings[engine] = db.settings
                rows.extend(bench_engine(db, modes, members, signer, opts, tmp, hosts))
    finally:
        signer.close()
    log("verification ceiling again")
    ceilings.append(verification_ceiling(members, args.ceiling_seconds))
    log(f"  {ceilings[1].rate:,.0f} verifications/s")
    load_after = loadavg()

    if args.markdown:
        print(table(rows, ceilings))
        if args.hosts > 1:
            print()
            print(scaling(rows))
        return 0
    nproc = len(os.sched_getaffinity(0))
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"- command: python {' '.join([sys.argv[0], *sys.argv[1:]])}")
    print(f"- CPU: {cpu_model()}, nproc {nproc}")
    print(f"- load average (1, 5, 15 min): {load_before} before, {load_after} after")
    print(
        f"- Python {platform.python_version()}, PyNaCl {version('pynacl')}, "
        f"uvicorn {version('uvicorn')}, httpx {version('httpx')}, psycopg {version('psycopg')}"
    )
    if "sqlite" in versions:
        print(f"- SQLite {versions['sqlite']}: {settings['sqlite']}")
    if "postgresql" in versions:
        print(f"- PostgreSQL {versions['postgresql']}: {settings['postgresql']}")
    kind = (
        "pre-built HTTP/1.1 requests on asyncio streams"
        + (" (uvloop)" if uvloop is not None else "")
        if args.http_client == "raw"
        else "httpx.AsyncClient"
    )
    print(
        f"- `ubc serve --workers {args.workers}` on 127.0.0.1 (uvicorn)"
        + (
            f", on 1 host and then on {args.hosts} hosts (separate processes on their own "
            "ports, one database; clients spread evenly over them)"
            if args.hosts > 1
            else ""
        )
        + f"; clients: {kind} in "
        f"{args.client_processes} process(es), one keep-alive connection each, "
        f"{args.clients} for single envelopes, {args.batch_clients} for batches (non-atomic)"
    )
    print(
        f"- client, server and PostgreSQL share the same {nproc} cores of this machine; "
        "the CPU column is the median over runs of the cores each used (postgres = every "
        "local postgres process; machine = all processes, other work included)"
    )
    print(
        f"- {args.members} members, transfers of 1 CU between random pairs, each envelope "
        f"signed by its sender before the clock starts; {args.runs} runs of ~{args.seconds:g} s "
        "per mode, modes alternating; medians"
    )
    for when, c in zip(("before", "after"), ceilings, strict=True):
        print(
            f"- verification ceiling {when} the engines: PyNaCl Ed25519 verify over a "
            f"{c.message_bytes}-byte transfer PAE, {c.processes} processes for {c.seconds:g} s: "
            f"{c.rate:,.0f}/s (per process {min(c.per_process):,.0f}–{max(c.per_process):,.0f}/s)"
        )
    print(
        f"- ratio to ceiling: transfers/s over the higher ceiling, "
        f"{max(c.rate for c in ceilings):,.0f}/s"
    )
    print()
    print(table(rows, ceilings))
    if args.hosts > 1:
        print()
        print(scaling(rows))
    return 0


def _cpu_profile_main(args: argparse.Namespace, opts: Options) -> int:
    started = datetime.now(UTC)
    members = Members.generate(args.members)
    signer = Signer(members, args.seed)
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ubc-bench-")))
            db = stack.enter_context(fresh_database("postgresql", args.postgres_url, tmp))
            log(f"postgresql: fresh database and data dir, {args.members} members")
            runs = cpu_profile(db, members, signer, opts, tmp, args.cpu_profile, args.clients)
    finally:
        signer.close()
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"- command: python {' '.join([sys.argv[0], *sys.argv[1:]])}")
    print(f"- CPU: {cpu_model()}, nproc {len(os.sched_getaffinity(0))}")
    print()
    print(cpu_profile_report(runs, args.workers, args.clients, args.cpu_profile))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the server was stopped and the benchmark database dropped")
        sys.exit(130)
