"""Helpers of ``scripts/bench_gateway.py``: subprocesses, CPU accounting, machine facts, a
fresh database, and a fast closed-loop HTTP/1.1 load generator in its own process; and,
shared with ``scripts/bench_envelopes.py``, several ``ubc serve`` processes on one
database standing for several hosts (:func:`running_hosts`).

The load generator is a forked process (so it shares no GIL with anything measured)
running one keep-alive connection per concurrent client on asyncio streams (uvloop when
installed). Each client writes one pre-built request, reads the status line, the headers
and the body (``content-length`` or chunked), records the time, and sends the next: about
60 µs of client CPU per call on this machine. Answers are parsed only after the clock stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psutil
import psycopg
from sqlalchemy.engine import make_url

try:
    import uvloop
except ImportError:  # uvicorn[standard] brings it; without it asyncio's own loop is used
    uvloop = None  # type: ignore[assignment]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def child_signals() -> None:
    """In helper processes: Ctrl-C is the main process's to handle; SIGTERM kills."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- machine ----------------------------------------------------------------------------------


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


def ram_gib() -> float:
    return psutil.virtual_memory().total / 2**30


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


# --- CPU of processes ---------------------------------------------------------------------------


def cpu_by_pid(processes: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds so far of each process, by pid."""
    out = {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return cpu_by_pid([root, *root.children(recursive=True)])
    except psutil.Error:
        return {}


def postgres_cpu(database: str | None = None) -> dict[int, float]:
    """CPU seconds of the local ``postgres`` processes: with ``database``, its backends and
    the server's own background processes (WAL writer, checkpointer...), not the backends
    of other databases; else every one."""
    chosen = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] != "postgres":
            continue
        title = " ".join(p.info["cmdline"] or [])
        # A backend's title is "postgres: <cluster>: <user> <database> <host>(<port>) ...".
        backend = "(" in title or "[local]" in title
        if database is None or not backend or f" {database} " in title:
            chosen.append(p)
    return cpu_by_pid(chosen)


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots (processes that exited in between are lost)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


# --- subprocesses ---------------------------------------------------------------------------


class Children:
    """Every subprocess this script starts, each in its own session, stopped on exit."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[Any]] = []

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        # Its own session: Ctrl-C does not reach it half-way, and its whole process group
        # is stopped by stop(), whatever happens here.
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        # Anything left in the group (a child that outlived its parent) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            self.stop(process)


def read_line_within(stream: Any, timeout: float) -> str:
    """The next line of a subprocess's text stdout, or "" after ``timeout`` seconds."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


# --- several hosts -----------------------------------------------------------------------------


class AServer(Protocol):
    """A running ``ubc serve``: its base URL and its (supervisor) process."""

    @property
    def url(self) -> str: ...

    @property
    def process(self) -> subprocess.Popen[Any]: ...


S = TypeVar("S", bound=AServer)


@dataclass
class Hosts(Generic[S]):
    """``--hosts`` servers on one database, each a ``ubc serve`` on its own port (as on
    different hosts): set-up and reads use the first; the clients spread over all."""

    servers: list[S]

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of each server, for :class:`Load`."""
        out = []
        for url in self.urls:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            out.append((host, int(port)))
        return tuple(out)

    def cpu(self) -> dict[int, float]:
        """CPU seconds so far of every server process and worker, by pid."""
        out: dict[int, float] = {}
        for server in self.servers:
            out.update(tree_cpu(server.process.pid))
        return out


@contextlib.contextmanager
def running_hosts(
    start: Callable[[int], AbstractContextManager[S]], hosts: int
) -> Iterator[Hosts[S]]:
    """``hosts`` servers, ``start(i)`` for i = 0, 1...: each is entered (ready) before the
    next starts, so the first writes the genesis alone; all are stopped at the end."""
    with contextlib.ExitStack() as stack:
        yield Hosts([stack.enter_context(start(i)) for i in range(hosts)])


# --- a fresh database -------------------------------------------------------------------------


@dataclass
class Database:
    engine: str
    url: str  # what UBC_DATABASE_URL gets
    server_version: str
    settings: dict[str, str] = field(default_factory=dict)

    def connect(self) -> Any:
        """A plain DB-API connection in autocommit mode (reads that hold no lock)."""
        if self.engine == "sqlite":
            path = make_url(self.url).database
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
            conn.execute("PRAGMA query_only = 1")
            return conn
        conninfo = make_url(self.url).set(drivername="postgresql")
        return psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True)


@contextlib.contextmanager
def fresh_database(engine: str, postgres_url: str, tmp: Path, name: str) -> Iterator[Database]:
    """An empty database: a new SQLite file, or a new PostgreSQL database dropped after."""
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
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        conninfo = admin.set(database=name).render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            shown = {}
            for setting in (
                "server_version",
                "synchronous_commit",
                "fsync",
                "shared_buffers",
                "max_connections",
            ):
                row = conn.execute(f"SHOW {setting}").fetchone()
                shown[setting] = str(row[0]) if row else "?"
        server_version = shown.pop("server_version")
        url = admin.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
        yield Database(engine, url, server_version, shown)
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- statistics -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(q * len(ordered) + 0.999999)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]  # drop nan
    return statistics.median(clean) if clean else float("nan")


# --- the load generator -----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """``concurrency`` clients sending ``requests`` (round robin per client) to host:port
    for ``seconds``; each answer goes through ``parse`` (status, head, body) after the
    clock stops, which returns a result kept in ``LoadResult.parsed`` or raises
    ValueError (a malformed answer: counted as a failure). With ``addresses`` (several
    hosts), client i talks to ``addresses[i % len]`` instead: spread evenly."""

    host: str
    port: int
    requests: tuple[tuple[bytes, ...], ...]  # client i cycles through group i % len
    concurrency: int
    seconds: float
    addresses: tuple[tuple[str, int], ...] = ()

    def address(self, client: int) -> tuple[str, int]:
        if self.addresses:
            return self.addresses[client % len(self.addresses)]
        return self.host, self.port


@dataclass
class LoadResult:
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)  # -1: no answer (connection)
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls only
    parsed: list[Any] = field(default_factory=list)  # parse() of each successful call
    errors: list[str] = field(default_factory=list)  # the first few, with their text
    started: float = 0.0  # time.time()
    ended: float = 0.0
    client_cpu: float = 0.0  # CPU seconds of the load generator over the window

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds

    @property
    def failed(self) -> int:
        return sum(self.statuses.values()) - self.ok


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        at += 17
        body = await reader.readexactly(int(lower[at : lower.index(b"\r\n", at)]))
    elif b"\r\ntransfer-encoding: chunked" in lower:
        parts = []
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the end of the (empty) trailer section
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        body = b"".join(parts)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        raise ValueError("an answer without content-length or chunked encoding")
    return status, head, body


async def _one_client(
    host: str,
    port: int,
    requests: tuple[bytes, ...],
    offset: int,
    go: asyncio.Future[float],
    ready: Callable[[], None],
    answers: list[tuple[float, int, bytes, bytes]],
    errors: list[str],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    ready()
    end_at = await go
    i = offset
    n = len(requests)
    try:
        while True:
            request = requests[i % n]
            i += 1
            t0 = time.perf_counter()
            try:
                writer.write(request)
                status, head, body = await _read_answer(reader)
                answers.append((time.perf_counter() - t0, status, head, body))
                if b"\r\nconnection: close" in head.lower():
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
            except (
                OSError,
                ValueError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
            ) as e:
                answers.append((time.perf_counter() - t0, -1, b"", b""))
                if len(errors) < 20:
                    errors.append(f"{type(e).__name__}: {e}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            if time.time() >= end_at:
                return
    finally:
        writer.close()


async def _drive(load: Load, seconds: float, ready_event: Any, go_event: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    go: asyncio.Future[float] = loop.create_future()
    answers: list[tuple[float, int, bytes, bytes]] = []
    errors: list[str] = []
    connected = 0

    def ready() -> None:
        nonlocal connected
        connected += 1
        if connected == load.concurrency:
            ready_event.set()

    tasks = [
        asyncio.ensure_future(
            _one_client(
                *load.address(i),
                load.requests[i % len(load.requests)],
                i,
                go,
                ready,
                answers,
                errors,
            )
        )
        for i in range(load.concurrency)
    ]
    await asyncio.sleep(0)
    while not go_event.is_set():  # the parent samples the CPU counters, then says go
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.0005)
    started, cpu0 = time.time(), time.process_time()
    go.set_result(started + seconds)
    await asyncio.gather(*tasks)
    ended, cpu = time.time(), time.process_time() - cpu0
    return {
        "answers": answers,
        "errors": errors,
        "started": started,
        "ended": ended,
        "cpu": cpu,
    }


def _load_process(
    load: Load,
    parse: Callable[[int, bytes, bytes], Any],
    ready_event: Any,
    go_event: Any,
    out: Any,
) -> None:
    child_signals()
    try:
        drive = _drive(load, load.seconds, ready_event, go_event)
        raw = uvloop.run(drive) if uvloop is not None else asyncio.run(drive)
        out.put(("done", raw["ended"]))
        result = LoadResult(
            started=raw["started"], ended=raw["ended"], client_cpu=raw["cpu"], errors=raw["errors"]
        )
        for latency, status, head, body in raw["answers"]:
            if status == 200:
                try:
                    result.parsed.append(parse(status, head, body))
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    status = -2  # a 200 whose content is wrong
                    if len(result.errors) < 20:
                        result.errors.append(f"bad 200 answer ({exc}): {body[:300]!r}")
                else:
                    result.ok += 1
                    result.latencies.append(latency)
            elif status > 0 and len(result.errors) < 20:
                result.errors.append(f"HTTP {status}: {body[:300]!r}")
            result.statuses[status] += 1
        out.put(("result", result))
    except BaseException as exc:  # report it rather than leave the parent waiting
        out.put(("crash", f"{type(exc).__name__}: {exc}"))


@dataclass
class Window:
    """What the measured processes used between the start and the end of a load."""

    cpu: dict[str, float]  # CPU seconds by name ("server", "postgres", "upstream", "machine")


def run_load(
    load: Load,
    parse: Callable[[int, bytes, bytes], Any],
    meters: dict[str, Callable[[], dict[int, float]]],
    after: Callable[[], object] | None = None,
) -> tuple[LoadResult, Window]:
    """Run ``load`` in a forked process; CPU of each meter from the moment every client is
    connected to the moment the last answer came and ``after()`` (e.g. wait until the
    server settled the calls' bills) returned."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    ready_event, go_event = ctx.Event(), ctx.Event()
    process = ctx.Process(target=_load_process, args=(load, parse, ready_event, go_event, out))
    process.start()
    try:
        if not ready_event.wait(60):
            raise RuntimeError(f"the load generator could not open {load.concurrency} connections")
        before = {name: meter() for name, meter in meters.items()}
        busy = machine_busy_seconds()
        go_event.set()
        kind, value = out.get(timeout=load.seconds + 600)
        if kind == "crash":
            raise RuntimeError(f"the load generator failed: {value}")
        if after is not None:
            after()
        used = {name: cpu_used(before[name], meter()) for name, meter in meters.items()}
        used["machine"] = machine_busy_seconds() - busy
        kind, value = out.get(timeout=600)
        if kind == "crash":
            raise RuntimeError(f"the load generator failed: {value}")
        result: LoadResult = value
        used["client"] = result.client_cpu
        return result, Window(used)
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.terminate()
        process.join()
