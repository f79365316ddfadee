"""Entries per second and peak memory of ``ubc audit verify`` on a journal of 1,000,000 entries.

The script builds a journal, verifies it offline the way an auditor does, and in the same
run measures the Ed25519 verification ceiling of this machine:

- **build** (cached in ``--workdir``): a fresh data dir (``ubc init``) and SQLite file
  database, genesis through ``ubc.runtime.load_runtime`` (open enrollment, a created_at
  window of ten years), ``--members`` ``member.register`` envelopes and as many operator
  ``deposit`` envelopes, then signed member-to-member transfers of 1 CU up to
  ``--entries`` journal entries. Transfers are signed in a process pool on every core,
  ahead of the writer, and submitted in batches of 1,000 exactly as the server's group
  commit does (``precheck`` outside the write transaction, then ``submit`` inside one
  ``unit_of_work``). Then ``ubc audit export <db url> -o export.jsonl``. The database, the
  data dir, the export and the vkey stay in the workdir and are reused by later runs with
  the same ``--entries`` and ``--members`` (delete it when the journal format or the rules
  change: a journal built by older code may no longer verify).
- **verify**: for each of ``--sizes`` (default: a tenth of ``--entries`` and all of it),
  ``ubc audit verify EXPORT --vkey VKEY --json`` in a subprocess, on the export of that
  many first entries (a prefix of the journal under a checkpoint of its size, signed with
  the ledger key as the server would have signed it then). Wall time (process start-up
  included) gives entries per second; the child's own peak RSS comes from ``wait4``, its
  CPU time from the same rusage, and a sampler records over the run its RSS (psutil) and
  the size of the replay's scratch database, which goes into a ``TMPDIR`` of its own
  (removed after; anything the verify left there is reported). Every run must report
  ``ok`` with the expected number of entries.
- **ceiling**: ``Pool(os.cpu_count())`` processes each verifying pre-made Ed25519
  signatures with PyNaCl over the PAE of a real transfer envelope for
  ``--ceiling-seconds``; the sum of their rates. Every journal entry needs at least one
  such verification, so no auditor on this machine verifies more entries per second. It
  runs before and after the verifies; ratios use the higher of the two.
- **latency**: ``ubc serve`` on the built database, then ``--latency-calls`` timed calls
  (after a warm-up) of ``GET /journal/checkpoint``,
  ``GET /journal/proof/inclusion?seq=<random>&size=N`` and
  ``GET /journal/proof/consistency?old=<random>&new=N`` over one keep-alive connection;
  median, p95 and min–max. Each proof is checked against its roots once, untimed.
- ``--profile K``: cProfile of ``verify_journal`` in this process on the first K entries;
  the top functions are printed to stderr and written to the workdir.

    python scripts/bench_audit.py --entries 1000000 --workdir /var/tmp/ubc-bench-audit
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import io
import json
import math
import multiprocessing as mp
import os
import platform
import pstats
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path
from typing import Any

import httpx
import psutil
from nacl.signing import SigningKey, VerifyKey

from ubc.audit.source import FORMAT, from_export
from ubc.audit.verify import verify_journal
from ubc.config import Settings
from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import Accepted, LedgerContext, precheck, sign_payload, submit
from ubc.journal import store
from ubc.journal.checkpoint import format_checkpoint
from ubc.journal.merkle import verify_consistency, verify_inclusion
from ubc.migrations import upgrade
from ubc.runtime import load_runtime
from ubc.signing import NoteSigner, encode_public_key, load_signing_key, pae

ORIGIN = "bench.ubc/audit"
ASSET = "CU"
FUNDING = 10**12  # per member: no benchmark transfer is ever refused for funds
SKEW_SECONDS = 10 * 365 * 86400  # pre-signed envelopes stay inside the created_at window
BATCH = 1000  # envelopes per submit, the server's batch limit
TARGET = 0.5  # verified entries/s over the two-core verification ceiling
FLAT = 1.25  # "flat": peak RSS at the largest size at most this times the smallest's
MIB = 1024 * 1024


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _child_signals() -> None:
    # Ctrl-C reaches the whole process group: pool workers ignore it and the main process
    # tears everything down; SIGTERM (how a pool is terminated) must kill them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- signing (process pool) -----------------------------------------------------------------

_SIGNER_KEYS: list[SigningKey] = []
_SIGNER_HANDLES: list[str] = []


def _set_signers(seeds: list[bytes], handles: list[str]) -> None:
    _SIGNER_KEYS[:] = [SigningKey(seed) for seed in seeds]
    _SIGNER_HANDLES[:] = handles


def _init_signer(seeds: list[bytes], handles: list[str]) -> None:
    _child_signals()
    _set_signers(seeds, handles)


def _transfer(sender: int, recipient: int, created_at: str) -> dict[str, Any]:
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
    return sign_payload(payload, "transfer", [_SIGNER_KEYS[sender]]).to_json()


def _sign_transfers(pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The envelope JSON of one transfer of 1 CU per (sender, recipient) pair."""
    created_at = format_timestamp(datetime.now(UTC))
    return [_transfer(sender, recipient, created_at) for sender, recipient in pairs]


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


# --- the verification ceiling ---------------------------------------------------------------


def _verify_for(items: list[tuple[bytes, bytes, bytes]], start_at: float, end_at: float) -> float:
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
    return done / (time.time() - started)


@dataclass
class Ceiling:
    processes: int
    seconds: float
    per_process: list[float]
    message_bytes: int

    @property
    def rate(self) -> float:
        return sum(self.per_process)


def verification_ceiling(seconds: float) -> Ceiling:
    """Ed25519 verifications per second in a Pool of one process per core, summed."""
    keys = [SigningKey.generate() for _ in range(64)]
    handles = [f"m{i:05d}" for i in range(len(keys))]
    _set_signers([bytes(k) for k in keys], handles)
    items = []
    created_at = format_timestamp(datetime.now(UTC))
    for i, key in enumerate(keys):
        raw = _transfer(i, (i + 1) % len(keys), created_at)
        body = base64.b64decode(raw["payload"])
        message = pae(raw["payloadType"], body)
        items.append(
            (bytes(key.verify_key), message, base64.b64decode(raw["signatures"][0]["sig"]))
        )
    processes = os.cpu_count() or 1
    with mp.get_context("fork").Pool(processes, initializer=_child_signals) as pool:
        start_at = time.time() + 0.5
        rates = pool.starmap(
            _verify_for, [(items, start_at, start_at + seconds)] * processes, chunksize=1
        )
    return Ceiling(processes, seconds, rates, sum(len(m) for _, m, _ in items) // len(items))


# --- building the journal -------------------------------------------------------------------


def ubc_command() -> list[str]:
    beside = Path(sys.executable).with_name("ubc")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ubc")
    if found:
        return [found]
    return [sys.executable, "-c", "from ubc.cli import main; main()"]


def git_commit() -> str:
    """The commit of the ubc code in use, with ``+dirty`` for local changes; or ''."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "ubc"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def ubc_env(url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UBC_")}
    env.update(
        UBC_DATABASE_URL=url,
        UBC_DATA_DIR=str(data_dir),
        UBC_ORIGIN=ORIGIN,
        UBC_ENROLLMENT="open",
        UBC_CREATED_AT_SKEW_SECONDS=str(SKEW_SECONDS),
        **extra,
    )
    return env


@dataclass
class Built:
    """A journal in the workdir; ``build.json`` holds everything but the paths."""

    directory: Path
    entries: int
    members: int
    types: dict[str, int]
    vkey: str
    build_seconds: float
    export_seconds: float
    db_bytes: int
    export_bytes: int
    built_at: str
    commit: str = ""  # of the ubc code that built it
    reused: bool = False

    @property
    def url(self) -> str:
        return f"sqlite:///{self.directory / 'ubc.db'}"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def export(self) -> Path:
        return self.directory / "export.jsonl"

    def save(self) -> None:
        info = asdict(self)
        del info["directory"], info["reused"]
        (self.directory / "vkey").write_text(self.vkey + "\n")
        (self.directory / "build.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Built | None:
        try:
            info = json.loads((directory / "build.json").read_text())
            built = cls(directory, **info, reused=True)
        except (OSError, ValueError, TypeError):
            return None
        needed = (built.directory / "ubc.db", built.export, built.data_dir / "ledger.key")
        return built if all(p.exists() for p in needed) else None


def _submit_all(
    sessions: Any, ctx: LedgerContext, envelopes: list[dict[str, Any]], what: str
) -> None:
    """One group-commit batch: precheck outside the write transaction, then submit."""
    with sessions() as session:
        checked = precheck(session, ctx, envelopes)
    with unit_of_work(sessions) as session:
        outcomes = submit(session, ctx, checked)
    refused = [o for o in outcomes if not isinstance(o, Accepted)]
    if refused:
        raise RuntimeError(f"{what}: {len(refused)} of {len(outcomes)} refused: {refused[0]!r}")


def build_journal(directory: Path, entries: int, members: int, seed: int) -> Built:
    cached = Built.load(directory)
    if cached is not None and (cached.entries, cached.members) == (entries, members):
        log(f"reusing the journal of {entries:,} entries in {directory}")
        if cached.commit != git_commit():
            log(
                f"  note: built by commit {cached.commit or 'unknown'}, this is {git_commit()}; "
                "delete the workdir if the journal format or the rules changed since"
            )
        return cached
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    data_dir = directory / "data"
    url = f"sqlite:///{directory / 'ubc.db'}"
    transfers = entries - 1 - 2 * members
    log(
        f"building {entries:,} entries in {directory}: genesis, {members:,} registrations, "
        f"{members:,} deposits, {transfers:,} transfers"
    )
    subprocess.run(
        [*ubc_command(), "init", "--data-dir", str(data_dir)],
        env=ubc_env(url, data_dir),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    keys = [SigningKey.generate() for _ in range(members)]
    handles = [f"m{i:05d}" for i in range(members)]
    processes = os.cpu_count() or 1
    # The pool forks before any database connection exists.
    pool: Pool = mp.get_context("fork").Pool(
        processes, initializer=_init_signer, initargs=([bytes(k) for k in keys], handles)
    )
    started = time.perf_counter()
    engine = make_engine(url)
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        settings = Settings(
            database_url=url,
            data_dir=data_dir,
            origin=ORIGIN,
            enrollment="open",
            created_at_skew_seconds=SKEW_SECONDS,
        )
        with unit_of_work(sessions) as session:
            runtime = load_runtime(settings, session)
        ctx = runtime.ctx
        operator = load_signing_key(data_dir / "operator.key")
        registrations = [
            _envelope(
                "member.register",
                [key],
                actor=f"member:{handle}",
                handle=handle,
                public_key=encode_public_key(bytes(key.verify_key)),
            )
            for key, handle in zip(keys, handles, strict=True)
        ]
        deposits = [
            _envelope(
                "deposit",
                [operator],
                actor="operator",
                to=f"member:{handle}",
                asset=ASSET,
                amount=FUNDING,
                external_ref=f"bench-{handle}",
            )
            for handle in handles
        ]
        for what, envelopes in (("member.register", registrations), ("deposit", deposits)):
            for start in range(0, len(envelopes), BATCH):
                _submit_all(sessions, ctx, envelopes[start : start + BATCH], what)
        rng = random.Random(seed)

        def pairs(n: int) -> list[tuple[int, int]]:
            out = []
            for _ in range(n):
                sender = rng.randrange(members)
                recipient = rng.randrange(members - 1)
                recipient += recipient >= sender  # a random other member
                out.append((sender, recipient))
            return out

        # Signing runs a few batches ahead of the writer, never the whole journal ahead.
        ahead: deque[AsyncResult[list[dict[str, Any]]]] = deque()
        queued = done = 0
        transfer_start = last_log = time.perf_counter()
        while done < transfers:
            while len(ahead) < 4 * processes and queued < transfers:
                n = min(BATCH, transfers - queued)
                ahead.append(pool.apply_async(_sign_transfers, (pairs(n),)))
                queued += n
            batch = ahead.popleft().get()
            _submit_all(sessions, ctx, batch, "transfer")
            done += len(batch)
            now = time.perf_counter()
            if now - last_log >= 30 or done == transfers:
                log(f"  {done:,}/{transfers:,} transfers, {done / (now - transfer_start):,.0f}/s")
                last_log = now
        with sessions() as session:
            size, _ = store.latest_checkpoint(session)
        if size != entries:
            raise RuntimeError(f"built {size} entries, wanted {entries}")
    finally:
        pool.terminate()
        pool.join()
        engine.dispose()
    build_seconds = time.perf_counter() - started
    log(f"  built in {build_seconds:,.0f} s; exporting")
    export = directory / "export.jsonl"
    started = time.perf_counter()
    subprocess.run(
        [*ubc_command(), "audit", "export", url, "-o", str(export)],
        env=ubc_env(url, data_dir),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    export_seconds = time.perf_counter() - started
    built = Built(
        directory,
        entries,
        members,
        {
            "ledger.genesis": 1,
            "member.register": members,
            "deposit": members,
            "transfer": transfers,
        },
        runtime.info["vkey"],
        build_seconds,
        export_seconds,
        _size_of(directory / "ubc.db", directory / "ubc.db-wal"),
        export.stat().st_size,
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        git_commit(),
    )
    built.save()
    log(f"  exported in {export_seconds:,.0f} s")
    return built


def _size_of(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def prefix_export(built: Built, size: int) -> Path:
    """The export of the first ``size`` entries under a checkpoint of that size.

    The checkpoint is what the ledger signed (or would have signed) when the journal had
    ``size`` entries: the root of that prefix from the stored Merkle nodes, signed with
    the ledger key of the data dir.
    """
    if size == built.entries:
        return built.export
    path = built.directory / f"export-{size}.jsonl"
    if path.exists():
        return path
    engine = make_engine(built.url, readonly=True)
    try:
        with make_session_factory(engine)() as session:
            root = store.root(session, size)
    finally:
        engine.dispose()
    signer = NoteSigner(ORIGIN, load_signing_key(built.data_dir / "ledger.key"))
    header = {
        "format": FORMAT,
        "origin": ORIGIN,
        "size": size,
        "checkpoint": signer.sign(format_checkpoint(ORIGIN, size, root)),
    }
    partial = path.with_suffix(".partial")
    with built.export.open(encoding="utf-8") as src, partial.open("w", encoding="utf-8") as out:
        src.readline()
        out.write(json.dumps(header) + "\n")
        for _ in range(size):
            out.write(src.readline())
    partial.rename(path)
    return path


# --- verifying ------------------------------------------------------------------------------


@dataclass
class VerifyRun:
    size: int
    seconds: float
    cpu_seconds: float
    peak_rss: int  # bytes, the child's own ru_maxrss
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s, rss, scratch)
    left_behind: int = 0  # bytes of scratch files still there after the run
    machine_cpu_seconds: float = 0.0  # every process on the machine, this one included

    @property
    def scratch_peak(self) -> int:
        """The largest sampled size of the replay's scratch database (bytes)."""
        return max((s[2] for s in self.samples), default=0)

    @property
    def rate(self) -> float:
        return self.size / self.seconds

    def rss_at(self, fraction: float) -> int:
        """The sampled RSS nearest to ``fraction`` of the run."""
        if not self.samples:
            return 0
        when = fraction * self.seconds
        return min(self.samples, key=lambda s: abs(s[0] - when))[1]


def _sample(pid: int, scratch: Path, out: list[tuple[float, int, int]], started: float) -> None:
    """RSS of the verify process and size of its scratch dir, every 0.2 s until it exits."""
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        while True:
            rss = process.memory_info().rss
            out.append((time.perf_counter() - started, rss, _tree_bytes(scratch)))
            time.sleep(0.2)


def _busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle, not waiting on I/O) since boot."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _tree_bytes(directory: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for path in directory.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
    return total


def run_verify(built: Built, size: int, export: Path) -> VerifyRun:
    scratch = built.directory / f"verify-tmp-{size}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    out_path = built.directory / f"verify-{size}.json"
    err_path = built.directory / f"verify-{size}.stderr"
    command = [*ubc_command(), "audit", "verify", str(export), "--vkey", built.vkey, "--json"]
    env = ubc_env(built.url, built.data_dir, TMPDIR=str(scratch))
    samples: list[tuple[float, int, int]] = []
    machine_before = _busy_seconds()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        sampler = threading.Thread(
            target=_sample, args=(process.pid, scratch, samples, started), daemon=True
        )
        sampler.start()
        try:
            # wait4: this child's own rusage (RUSAGE_CHILDREN would mix in the pools).
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        seconds = time.perf_counter() - started
        machine = _busy_seconds() - machine_before
        process.returncode = os.waitstatus_to_exitcode(status)
    sampler.join(timeout=5)
    left_behind = _tree_bytes(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        report = json.loads(out_path.read_text())
    except ValueError:
        report = {}
    if process.returncode != 0 or not report.get("ok") or report.get("entries") != size:
        tail = err_path.read_text(errors="replace")[-2000:]
        findings = report.get("findings", [])[:3]
        raise RuntimeError(
            f"verify of {size} entries: exit {process.returncode}, "
            f"report { ({k: v for k, v in report.items() if k != 'findings'}) }, "
            f"findings {findings}, stderr {tail}"
        )
    return VerifyRun(
        size,
        seconds,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss * 1024,  # kilobytes on Linux
        samples,
        left_behind,
        machine,
    )


def profile_verify(built: Built, size: int, top: int) -> str:
    """cProfile of ``verify_journal`` in this process on the first ``size`` entries."""
    export = prefix_export(built, size)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="ubc-bench-audit-profile-") as tmp:
        old_tmp = tempfile.tempdir
        tempfile.tempdir = tmp  # the scratch replay db goes here and is removed with it
        try:
            started = time.perf_counter()
            profiler.enable()
            report = verify_journal(from_export(export), built.vkey)
            profiler.disable()
            seconds = time.perf_counter() - started
        finally:
            tempfile.tempdir = old_tmp
    if not report.ok or report.entries != size:
        raise RuntimeError(f"profiled verify failed: {report.to_json()}")
    text = io.StringIO()
    text.write(
        f"cProfile of verify_journal on {size:,} entries: {seconds:.1f} s under the "
        f"profiler ({size / seconds:,.0f} entries/s)\n"
    )
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# --- checkpoint and proof latency -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(built: Built) -> Iterator[tuple[str, float]]:
    """``ubc serve`` on the built database; yields its URL and seconds until ready."""
    port = _free_port()
    log_path = built.directory / "serve.log"
    command = [*ubc_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            env=ubc_env(built.url, built.data_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = None
        with httpx.Client(base_url=url, timeout=5) as client:
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/readyz").status_code == 200:
                        ready = time.perf_counter() - started
                        break
                time.sleep(0.1)
        if ready is None:
            raise RuntimeError(f"the server did not become ready; see {log_path}")
        yield url, ready
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


@dataclass
class Latency:
    request: str
    times: list[float]  # seconds

    def ms(self, q: float) -> float:
        ordered = sorted(self.times)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times)


def measure_latency(built: Built, calls: int, seed: int) -> tuple[list[Latency], float]:
    n = built.entries
    rng = random.Random(seed)
    requests = [
        ("GET /journal/checkpoint", "/journal/checkpoint"),
        (f"GET /journal/proof/inclusion?seq=random&size={n:,}", "/journal/proof/inclusion"),
        (f"GET /journal/proof/consistency?old=random&new={n:,}", "/journal/proof/consistency"),
    ]

    def params(path: str) -> dict[str, int]:
        if path == "/journal/proof/inclusion":
            return {"seq": rng.randrange(n), "size": n}
        if path == "/journal/proof/consistency":
            return {"old": rng.randrange(1, n), "new": n}
        return {}

    results = []
    with running_server(built) as (url, ready), httpx.Client(base_url=url, timeout=60) as client:
        for label, path in requests:
            for _ in range(5):  # warm-up: connection, statement caches, page cache
                _check(client.get(path, params=params(path)), path, n)
            times = []
            for _ in range(calls):
                query = params(path)
                started = time.perf_counter()
                response = client.get(path, params=query)
                times.append(time.perf_counter() - started)
                _check(response, path, n)
            results.append(Latency(label, times))
    return results, ready


def _check(response: httpx.Response, path: str, size: int) -> None:
    """Every timed answer is 200 and right: the size, and proofs that verify."""
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
    if path == "/journal/checkpoint":
        if int(response.text.split("\n")[1]) != size:
            raise RuntimeError(f"checkpoint of size {response.text.split()[1]}, want {size}")
        return
    body = response.json()
    proof = [base64.b64decode(h) for h in body["proof"]]
    if path == "/journal/proof/inclusion":
        verify_inclusion(
            base64.b64decode(body["leaf_hash"]),
            body["seq"],
            body["size"],
            proof,
            base64.b64decode(body["root"]),
        )
    else:
        verify_consistency(
            body["old"],
            body["new"],
            base64.b64decode(body["old_root"]),
            base64.b64decode(body["new_root"]),
            proof,
        )


# --- reporting ------------------------------------------------------------------------------


def verify_table(runs: list[VerifyRun], ceiling: float) -> str:
    lines = [
        "| entries | verify wall s | entries/s | ratio to ceiling | target ≥ 50% "
        "| entries per verify CPU-second | CPU cores used: verify / machine | peak RSS MiB "
        "| RSS at 50% / 90% of the run MiB | scratch replay db MiB (peak) |",
        "|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ratio = r.rate / ceiling
        lines.append(
            f"| {r.size:,} | {r.seconds:,.1f} | {r.rate:,.0f} | {ratio:.1%} "
            f"| {'yes' if ratio >= TARGET else 'no'} | {r.size / r.cpu_seconds:,.0f} "
            f"| {r.cpu_seconds / r.seconds:.2f} / "
            f"{r.machine_cpu_seconds / r.seconds:.2f} "
            f"| {r.peak_rss / MIB:,.0f} | {r.rss_at(0.5) / MIB:,.0f} / {r.rss_at(0.9) / MIB:,.0f} "
            f"| {r.scratch_peak / MIB:,.0f} |"
        )
    lines.append(
        f"| Ed25519 verification ceiling | — | {ceiling:,.0f} | 100% | — | — "
        f"| {os.cpu_count()} | — | — | — |"
    )
    return "\n".join(lines)


def latency_table(latencies: list[Latency], calls: int) -> str:
    lines = [
        f"| request ({calls} calls) | median ms | p95 ms | min–max ms |",
        "|---|---:|---:|---:|",
    ]
    for lat in latencies:
        lines.append(
            f"| `{lat.request}` | {lat.median_ms:.2f} | {lat.ms(0.95):.2f} "
            f"| {1000 * min(lat.times):.2f}–{1000 * max(lat.times):.2f} |"
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
    parser.add_argument("--entries", type=int, default=1_000_000, help="journal entries")
    parser.add_argument("--members", type=int, default=1000, help="registered, funded members")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep and reuse the built journal here (default: a temporary directory)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated journal sizes to verify (prefixes); default: entries/10,entries",
    )
    parser.add_argument("--ceiling-seconds", type=float, default=3.0)
    parser.add_argument("--latency-calls", type=int, default=50, help="timed calls per request")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="K", help="cProfile a verify of K entries"
    )
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="print only the tables")
    args = parser.parse_args(argv)
    if args.members < 2:
        parser.error("need at least 2 members")
    if args.entries < 2 * args.members + 2:
        parser.error(f"need more than 2 x members + 1 = {2 * args.members + 1} entries")
    if args.sizes is None:
        sizes = sorted({max(1, args.entries // 10), args.entries})
    else:
        sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    if any(not 1 <= s <= args.entries for s in sizes):
        parser.error(f"sizes must be 1 to --entries ({args.entries})")
    if args.profile and not 1 <= args.profile <= args.entries:
        parser.error("--profile K needs 1 ≤ K ≤ --entries")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = datetime.now(UTC)
    load_before = loadavg()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ubc-bench-")))
        else:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        directory = workdir / f"journal-{args.entries}-m{args.members}"
        built = build_journal(directory, args.entries, args.members, args.seed)
        exports = {size: prefix_export(built, size) for size in sizes}

        log(f"verification ceiling: {os.cpu_count()} processes for {args.ceiling_seconds:g} s")
        ceilings = [verification_ceiling(args.ceiling_seconds)]
        log(f"  {ceilings[0].rate:,.0f} verifications/s")
        runs = []
        for size in sizes:
            log(f"ubc audit verify: {size:,} entries")
            run = run_verify(built, size, exports[size])
            log(
                f"  {run.seconds:,.1f} s, {run.rate:,.0f} entries/s, "
                f"peak RSS {run.peak_rss / MIB:,.0f} MiB"
            )
            if run.left_behind:
                log(f"  the verify left {run.left_behind / MIB:,.1f} MiB of scratch files")
            runs.append(run)
        log("verification ceiling again")
        ceilings.append(verification_ceiling(args.ceiling_seconds))
        log(f"  {ceilings[1].rate:,.0f} verifications/s")
        ceiling = max(c.rate for c in ceilings)

        log(f"latency at {built.entries:,} entries: ubc serve, {args.latency_calls} calls each")
        latencies, ready = measure_latency(built, args.latency_calls, args.seed)
        for lat in latencies:
            log(f"  {lat.request}: median {lat.median_ms:.2f} ms")
        profile = ""
        if args.profile:
            log(f"cProfile of verify_journal on {args.profile:,} entries")
            profile = profile_verify(built, args.profile, 30)
            path = workdir / f"profile-verify-{args.profile}.txt"
            path.write_text(profile)
            log(profile)
            log(f"  written to {path}")
    load_after = loadavg()

    tables = verify_table(runs, ceiling) + "\n\n" + latency_table(latencies, args.latency_calls)
    if args.markdown:
        print(tables)
        return 0
    nproc = len(os.sched_getaffinity(0))
    memory = psutil.virtual_memory().total / 1024**3
    smallest, largest = runs[0], runs[-1]
    growth = largest.peak_rss / smallest.peak_rss
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC")
    print(f"- command: python {' '.join([sys.argv[0], *sys.argv[1:]])}")
    print(f"- ubc commit: {git_commit() or 'unknown'}")
    print(f"- CPU: {cpu_model()}, nproc {nproc}, {memory:.0f} GB RAM")
    print(f"- load average (1, 5, 15 min): {load_before} before, {load_after} after")
    print(
        f"- Python {platform.python_version()}, PyNaCl {version('pynacl')}, "
        f"SQLAlchemy {version('sqlalchemy')}, SQLite {sqlite3.sqlite_version}"
    )
    mix = ", ".join(f"{count:,} {kind}" for kind, count in Counter(built.types).items())
    print(
        f"- journal: {built.entries:,} entries ({mix}), {built.members:,} members; "
        f"SQLite db {built.db_bytes / MIB:,.0f} MiB, export {built.export_bytes / MIB:,.0f} MiB; "
        + (
            f"reused from {built.built_at} (commit {built.commit or 'unknown'})"
            if built.reused
            else f"built in {built.build_seconds:,.0f} s "
            f"({(built.entries - 1) / built.build_seconds:,.0f} entries/s)"
        )
        + f", exported in {built.export_seconds:,.0f} s"
    )
    print(
        "- verify: `ubc audit verify EXPORT --vkey VKEY --json` in a subprocess on the first "
        "N entries (prefix export under a checkpoint of size N); wall time including "
        "start-up; peak RSS is the child's ru_maxrss; CPU cores used = (user + sys) / wall, "
        "of the verify and of the whole machine (other work included) over the same time"
    )
    for when, c in zip(("before", "after"), ceilings, strict=True):
        print(
            f"- verification ceiling {when} the verifies: PyNaCl Ed25519 verify over a "
            f"{c.message_bytes}-byte transfer PAE, Pool({c.processes}) for {c.seconds:g} s: "
            f"{c.rate:,.0f}/s (per process {min(c.per_process):,.0f}–"
            f"{max(c.per_process):,.0f}/s)"
        )
    print(f"- ratio to ceiling: entries/s over the higher ceiling, {ceiling:,.0f}/s")
    print(
        f"- memory: peak RSS {largest.peak_rss / MIB:,.0f} MiB at {largest.size:,} entries vs "
        f"{smallest.peak_rss / MIB:,.0f} MiB at {smallest.size:,} ({growth:.2f}×): "
        f"{'flat' if growth <= FLAT else 'NOT flat'} (flat: ≤ {FLAT:g}×)"
    )
    print(
        f"- latency: `ubc serve` (1 worker) on the {built.entries:,}-entry SQLite db, ready "
        f"{ready:.1f} s after start; one keep-alive httpx client; 5 warm-up calls each"
    )
    print()
    print(tables)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
