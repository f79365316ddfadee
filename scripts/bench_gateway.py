"""The metered model endpoint against the same upstream called directly, in one run.

For each engine (PostgreSQL by default, in a fresh database; SQLite with ``--engines``)
this starts the fake OpenAI upstream of ``tests/upstream.py`` with a fixed latency
(``--latency-ms``, 20) and the real service (``ubc serve --workers 1`` on a fresh data
dir, metering and journaling on) with a models file serving ``bench-chat`` from that
upstream at 1,000 / 2,000 CU per 1K input / output tokens (cost = prompt + 2 ×
completion tokens) and the local embedding model re-priced at 1,000 CU per 1K tokens
(cost = its tokens). One member (``--members``) holds a large deposit and an API key
with no rate limit and no spend cap. Then, alternating direct and through ubc at each
concurrency, ``--runs`` times, each measurement ``--seconds`` long after a warm-up:

1. **chat**: non-streaming chat completions (16 output tokens) at ``--concurrency``
   (1, 50, 200): calls/s, p50 and p99 latency, the p50 that ubc adds, and CPU per call
   of the ubc server process (user + system over the measured window, which ends when
   every hold of the window is settled), of PostgreSQL (the database's backends and the
   server's background processes), and of the upstream.
2. **stream**: ``stream: true`` with ``stream_options.include_usage`` (16 token chunks)
   at ``--stream-concurrency`` (1, 50): time to last byte.
3. **embed**: the local model (``all-minilm-l6-v2``), one short sentence per call,
   through ubc at ``--embed-concurrency`` (1, 4): embeddings/s.

After each phase, once the server has settled every call: every successful call through
ubc (its ``x-request-id``) has exactly one journaled ``usage`` entry with the tokens of
its answer's usage and the cost computed from them, ``usage_records`` has as many rows
as the journal has usage entries, the member's posted balance went down by exactly the
sum of those costs, no hold is pending (``accounts.debits_pending`` and
``gateway_holds``) and none expired. Any failure is printed loudly, with non-200
answers counted by status.

The load generator is a separate process (no shared GIL) with one keep-alive HTTP/1.1
connection per concurrent client on asyncio streams (uvloop), sending pre-built
requests: about 60 µs of CPU per call here. Upstream, server, PostgreSQL and clients share
this machine's cores. ``--profile DIR`` adds one more chat measurement (not in the tables,
c=50 or ``--profile-concurrency``) under ``py-spy record --gil`` and prints where the
server's time goes.

    python scripts/bench_gateway.py --runs 3 --seconds 5
    python scripts/bench_gateway.py --seconds 2 --runs 1            # quick: about a minute

``--hosts N`` (N > 1) runs every phase twice in one run, each time on a fresh database
and data dir: on one server, then on N servers, each a ``ubc serve --workers`` of its own
on its own port (as on N hosts) against the same database, the clients spread evenly over
them (client i talks to server i mod N, so a concurrency below N leaves servers idle).
In both rounds every server has ``UBC_REDIS_URL`` (``--redis-url``, default
``redis://127.0.0.1:6379/0``; the script stops at once if it does not answer PING) and
the member's API key has limits (1,000,000 rpm, 10^12 tpm) that the calls never reach
but that make every call take its rpm and tpm from Redis, shared by the hosts as in
production; a 429 would show in the failures. After each round the script reads each
server's ``/metrics`` and reports whether every call took its limits from Redis: calls
whose round trip to Redis timed out (50 ms; likely on a loaded machine) were limited by
their process alone (``ubc_ratelimit_redis_fallbacks_total``), which is reported loudly
but does not fail the run (the billing checks do). The upstream is called directly in the
one-host round only (the comparison does not depend on ubc's hosts); the N-host rows
repeat its columns and their added p50 is measured against it. A table row per
concurrency and host count, and a scaling line per phase: the N-host median calls/s over
the one-host median, at each concurrency. The servers of one machine share its cores
with each other, the clients, the upstream, PostgreSQL and Redis: on a small machine the
ratio shows what N hosts cost in coordination (a Redis round trip per call, one more
connection pool, the journal lock), not what N machines would add. ``--profile`` samples
the one-host round only.

    python scripts/bench_gateway.py --runs 3 --seconds 5 --hosts 2
    python scripts/bench_gateway.py --hosts 2 --runs 1 --seconds 2 --warmup 0.5 \\
        --concurrency 1,8 --stream-concurrency 1 --embed-concurrency 1   # smoke: 2 minutes
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import redis
from _bench import (
    Children,
    Database,
    Hosts,
    Load,
    LoadResult,
    Window,
    cpu_model,
    free_port,
    fresh_database,
    loadavg,
    log,
    median,
    percentile,
    postgres_cpu,
    ram_gib,
    read_line_within,
    run_load,
    running_hosts,
    tree_cpu,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from ubc.client import UbcClient
from ubc.metering.rules import usage_cost
from ubc.signing import generate_signing_key, load_signing_key

try:
    import uvloop
except ImportError:  # the load generator then runs on asyncio's own loop
    uvloop = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# With Redis (``--hosts`` > 1), each key's rpm / tpm: limits checked in Redis on every call,
# high enough that no benchmark call is refused (any 429 is reported with the other failures).
KEY_RPM = 1_000_000  # the most an API key may have
KEY_TPM = 10**12
ORIGIN = "bench.ubc/ledger"
CHAT_MODEL = "bench-chat"
UPSTREAM_MODEL = "fake-chat"
EMBED_MODEL = "all-minilm-l6-v2"
EMBED_DIMENSIONS = 384
PRICES = {
    CHAT_MODEL: {"input": 1000, "output": 2000},
    EMBED_MODEL: {"input": 1000, "output": 0},
}
UPSTREAM_KEY = "sk-bench-upstream"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
DEPOSIT = 10**13  # CU per member: no call is ever refused or clamped for funds
OUTPUT_TOKENS = 16
PROMPT = "Summarise what the ledger recorded today in sixteen short words, please."
SENTENCES = [
    "The cat sat on the mat.",
    "A member spent a little compute on a model call.",
    "Ledgers balance debits and credits.",
    "It rained all day in the small town.",
    "The auditor checked every usage entry.",
    "Embeddings map sentences to vectors.",
    "She walked to the station before dawn.",
    "Holds reserve funds until the call settles.",
    "The river ran high after the storm.",
    "Prices are published in the journal.",
    "He plays the piano every evening.",
    "A short sentence for the benchmark.",
]

# Targets of issue 6 (with metering and journaling on).
TARGET_ADDED_P50_C1_MS = 2.0
TARGET_CPU_PER_CALL_MS = 1.0
TARGET_C50_RATE = 1000.0
TARGET_ADDED_P50_C50_MS = 10.0
LITELLM = (
    "LiteLLM 1.108 on this same machine, spend tracking off: +21–23 ms p50 at concurrency 1, "
    "about 20 ms of CPU per call, 55–80 calls/s at most"
)

MODELS_TOML = """\
local_embeddings = true

[models."{chat}"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "{upstream_model}"
api_key_env = "{key_env}"
input_price = {chat_in}
output_price = {chat_out}
max_output_tokens = 256

[models."{embed}"]
backend = "local"
kind = "embeddings"
input_price = {embed_in}
"""


# --- answers (parsed in the load generator after the clock stops) ---------------------------


@dataclass(frozen=True, slots=True)
class Billed:
    """A successful call: its ubc request id (None when direct) and its answer's usage."""

    request_id: str | None
    input_tokens: int
    output_tokens: int


def _request_id(head: bytes) -> str | None:
    at = head.lower().find(b"\r\nx-request-id:")
    if at < 0:
        return None
    at += 15
    return head[at : head.index(b"\r\n", at)].strip().decode()


def parse_chat(status: int, head: bytes, body: bytes) -> Billed:
    data = json.loads(body)
    content = data["choices"][0]["message"]["content"]
    usage = data["usage"]
    if len(content.split()) != usage["completion_tokens"]:
        raise ValueError(f"{len(content.split())} words but {usage['completion_tokens']} billed")
    return Billed(_request_id(head), int(usage["prompt_tokens"]), int(usage["completion_tokens"]))


def parse_stream(status: int, head: bytes, body: bytes) -> Billed:
    usage = None
    chunks = 0
    done = False
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
    if not done:
        raise ValueError("the stream has no [DONE]")
    if usage is None:
        raise ValueError("the stream has no usage chunk")
    if chunks != usage["completion_tokens"]:
        raise ValueError(f"{chunks} token chunks but {usage['completion_tokens']} billed")
    return Billed(_request_id(head), int(usage["prompt_tokens"]), int(usage["completion_tokens"]))


def parse_embedding(status: int, head: bytes, body: bytes) -> Billed:
    data = json.loads(body)
    vector = data["data"][0]["embedding"]
    if len(vector) != EMBED_DIMENSIONS:
        raise ValueError(f"a vector of {len(vector)} dimensions")
    return Billed(_request_id(head), int(data["usage"]["prompt_tokens"]), 0)


# --- requests ---------------------------------------------------------------------------------


def http_request(host: str, path: str, key: str, body: dict[str, Any]) -> bytes:
    content = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(content)}\r\n\r\n"
    )
    return head.encode() + content


def chat_body(model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": OUTPUT_TOKENS,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass(frozen=True)
class Target:
    """Where a measurement's requests go: the upstream directly, or ubc."""

    name: str  # "direct" or "ubc"
    host: str
    port: int
    requests: tuple[tuple[bytes, ...], ...]  # one group per API key; client i uses i % len
    addresses: tuple[tuple[str, int], ...] = ()  # several hosts: client i talks to i % len

    def load(self, concurrency: int, seconds: float) -> Load:
        return Load(self.host, self.port, self.requests, concurrency, seconds, self.addresses)


def target_for(
    name: str, base_url: str | Hosts[Server], path: str, keys: list[str], bodies: list[Any]
) -> Target:
    """Requests to ``base_url``, or spread over every server of ``Hosts``."""
    hosts = base_url if isinstance(base_url, Hosts) else None
    host = (hosts.url if hosts else str(base_url)).removeprefix("http://")
    h, port = host.rsplit(":", 1)
    groups = tuple(tuple(http_request(host, path, key, body) for body in bodies) for key in keys)
    addresses = hosts.addresses if hosts and len(hosts.servers) > 1 else ()
    return Target(name, h, int(port), groups, addresses)


# --- the services -----------------------------------------------------------------------------


def ubc_command() -> list[str]:
    beside = Path(sys.executable).with_name("ubc")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ubc")
    if found:
        return [found]
    return [sys.executable, "-c", "from ubc.cli import main; main()"]


@dataclass
class Upstream:
    url: str
    process: subprocess.Popen[str]

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"


def start_upstream(children: Children, latency_ms: float) -> Upstream:
    process = children.start(
        [
            sys.executable,
            str(ROOT / "tests" / "upstream.py"),
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
            "--api-key",
            UPSTREAM_KEY,
            "--answer-tokens",
            str(OUTPUT_TOKENS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = read_line_within(process.stdout, 30)
    prefix = "fake-upstream listening on "
    if not line.startswith(prefix):
        children.stop(process)
        raise RuntimeError(f"the fake upstream did not start (it printed {line!r})")
    return Upstream(line[len(prefix) :].strip(), process)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path


#: ``--spare-holds``: every server with UBC_GATEWAY_SPARE_HOLDS=1 (docs/http.md, Metering).
SPARE_HOLDS = False


def server_env(
    db: Database, data_dir: Path, models_file: Path, redis_url: str | None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UBC_")}
    env.update(
        UBC_DATABASE_URL=db.url,
        UBC_DATA_DIR=str(data_dir),
        UBC_ORIGIN=ORIGIN,
        UBC_MODELS_FILE=str(models_file),
        **{UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    if redis_url:
        env["UBC_REDIS_URL"] = redis_url
    if SPARE_HOLDS:
        env["UBC_GATEWAY_SPARE_HOLDS"] = "1"
    return env


@contextlib.contextmanager
def running_servers(
    children: Children,
    db: Database,
    upstream: Upstream,
    tmp: Path,
    workers: int = 1,
    hosts: int = 1,
    redis_url: str | None = None,
) -> Iterator[Hosts[Server]]:
    """``hosts`` ``ubc serve`` processes (each ``--workers``) on their own ports, on one
    database and one data dir (one ``ubc init``), all with ``redis_url`` if given."""
    data_dir = tmp / "data"
    models_file = tmp / "models.toml"
    models_file.write_text(
        MODELS_TOML.format(
            chat=CHAT_MODEL,
            api_base=upstream.api_base,
            upstream_model=UPSTREAM_MODEL,
            key_env=UPSTREAM_KEY_ENV,
            chat_in=PRICES[CHAT_MODEL]["input"],
            chat_out=PRICES[CHAT_MODEL]["output"],
            embed=EMBED_MODEL,
            embed_in=PRICES[EMBED_MODEL]["input"],
        )
    )
    env = server_env(db, data_dir, models_file, redis_url)
    subprocess.run(
        [*ubc_command(), "init", "--data-dir", str(data_dir)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )

    def start(i: int) -> contextlib.AbstractContextManager[Server]:
        name = "server.log" if hosts == 1 else f"server-{i + 1}.log"
        return running_server(children, env, data_dir, tmp / name, workers)

    with running_hosts(start, hosts) as servers:
        yield servers


@contextlib.contextmanager
def running_server(
    children: Children, env: dict[str, str], data_dir: Path, log_path: Path, workers: int
) -> Iterator[Server]:
    port = free_port()
    with log_path.open("wb") as out:
        process = children.start(
            [*ubc_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
            + ["--workers", str(workers)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, data_dir)
    try:
        wait_ready(server)
        yield server
    except BaseException:
        log(f"the server's log ends with:\n{log_path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        children.stop(process)


def wait_ready(server: Server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited with {server.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def redis_use(server: Server) -> dict[str, float]:
    """From the server's ``/metrics``: ``up`` (the last round trip to Redis for the rate
    limits succeeded), ``fallbacks`` (calls limited by the process alone because Redis
    could not be reached) and ``refusals`` (429s of a rate limit)."""
    out = {"up": float("nan"), "fallbacks": 0.0, "refusals": 0.0}
    try:
        text = httpx.get(f"{server.url}/metrics", timeout=10).raise_for_status().text
    except httpx.HTTPError as exc:
        log(f"  could not read {server.url}/metrics: {exc}")
        return out
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ubc_ratelimit_redis_up":
                out["up"] = sample.value
            elif sample.name == "ubc_ratelimit_redis_fallbacks_total":
                out["fallbacks"] += sample.value
            elif sample.name == "ubc_ratelimit_refusals_total":
                out["refusals"] += sample.value
    return out


def server_log_problems(server: Server) -> list[str]:
    lines = server.log_path.read_text(errors="replace").splitlines()
    return [
        line
        for line in lines
        if any(word in line for word in ("ERROR", "Traceback", "CRITICAL", "Exception"))
    ]


@dataclass
class Member:
    handle: str
    address: str
    secret: str


def set_up_members(server: Server, count: int, limited: bool = False) -> list[Member]:
    """Members admitted, funded with DEPOSIT, each with an API key without spend cap and
    without rate limits, or with ``limited`` limits no benchmark reaches (KEY_RPM, KEY_TPM:
    checked in Redis when it is configured)."""
    rpm, tpm = (KEY_RPM, KEY_TPM) if limited else (None, None)
    operator_token = (server.data_dir / "operator.token").read_text().strip()
    operator_key = load_signing_key(server.data_dir / "operator.key")
    members = []
    with UbcClient(server.url, key=operator_key, token=operator_token, timeout=60) as operator:
        for i in range(count):
            handle = f"bench{i:03d}"
            with UbcClient(server.url, key=generate_signing_key(), timeout=60) as client:
                client.register(handle)
                operator.admit(handle, "basic")
                operator.deposit(handle, DEPOSIT, external_ref=f"bench-{handle}")
                secret, _ = client.grant_api_key("bench", scopes=["models"], rpm=rpm, tpm=tpm)
            members.append(Member(handle, f"member:{handle}", secret))
    return members


# --- the ledger's side of the calls -------------------------------------------------------------


class Ledger:
    """Reads the benchmark database directly to check what the calls were billed."""

    def __init__(self, db: Database, members: list[Member]) -> None:
        self.db = db
        self.conn = db.connect()
        self.addresses = [m.address for m in members]
        self.last_seq = 0
        self.seen: dict[str, dict[str, Any]] = {}  # journaled usage payloads by request id
        self.duplicates: list[str] = []
        self.checked: set[str] = set()  # request ids of successful calls checked
        self.queries = 0  # our own statements (each its own transaction: autocommit)
        self.start_posted = self.posted()
        self.expected_total = 0

    def close(self) -> None:
        self.conn.close()

    def scalar(self, sql: str) -> int:
        self.queries += 1
        row = self.conn.execute(sql).fetchone()
        return int(row[0] or 0) if row else 0

    def transactions(self) -> dict[int, float]:
        """PostgreSQL's count of transactions in the benchmark's database, ours excluded
        (its statistics reach pg_stat_database up to a second late or so)."""
        total = self.scalar(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        return {0: float(total - self.queries)}

    def pending(self) -> int:
        return self.scalar("SELECT count(*) FROM accounts WHERE debits_pending <> 0")

    def posted(self) -> int:
        addresses = ", ".join(f"'{a}'" for a in self.addresses)
        return self.scalar(
            "SELECT sum(credits_posted - debits_posted) FROM accounts "
            f"WHERE asset = 'CU' AND address IN ({addresses})"
        )

    def wait_settled(self, timeout: float = 60.0) -> float:
        """Seconds until no hold is pending (every call's usage entry written)."""
        started = time.monotonic()
        while self.pending():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"holds still pending after {timeout:g} s")
            time.sleep(0.02)
        return time.monotonic() - started

    def read_new_usage(self) -> None:
        rows = self.conn.execute(
            "SELECT seq, entry FROM journal_entries "
            f"WHERE type = 'usage' AND seq > {self.last_seq} ORDER BY seq"
        ).fetchall()
        for seq, entry in rows:
            envelope = json.loads(bytes(entry))["envelope"]
            payload = json.loads(base64.b64decode(envelope["payload"]))
            request_id = payload["request_id"]
            if request_id in self.seen:
                self.duplicates.append(request_id)
            self.seen[request_id] = payload
            self.last_seq = max(self.last_seq, int(seq))

    def check(self, phase: str, model: str, calls: list[Billed], failed: int) -> Check:
        """Every successful call of ``calls`` billed exactly once, at its usage's cost."""
        settle = self.wait_settled()
        self.read_new_usage()
        check = Check(phase, len(calls), failed, settle)
        price = PRICES[model]
        for call in calls:
            if call.request_id is None:
                check.problems.append("a successful call through ubc without x-request-id")
                continue
            if call.request_id in self.checked:
                check.problems.append(f"request id {call.request_id} answered twice")
                continue
            self.checked.add(call.request_id)
            expected = usage_cost(call.input_tokens, call.output_tokens, price)
            check.expected_cost += expected
            payload = self.seen.get(call.request_id)
            if payload is None:
                check.lost += 1
                continue
            check.journaled += 1
            got = (payload["input_tokens"], payload["output_tokens"], payload["cost"])
            if (
                got != (call.input_tokens, call.output_tokens, expected)
                or payload["model"] != model
            ):
                check.wrong += 1
                if len(check.problems) < 10:
                    check.problems.append(
                        f"{call.request_id}: journaled {payload['model']} {got}, answered "
                        f"{(call.input_tokens, call.output_tokens, expected)}"
                    )
        self.expected_total += check.expected_cost
        # Usage entries of no successful call (failed calls): they must bill nothing.
        others = [p for r, p in self.seen.items() if r not in self.checked]
        check.unbilled_failures = sum(1 for p in others if p["cost"] == 0)
        check.billed_unknown = sum(1 for p in others if p["cost"] != 0)
        check.duplicates = len(self.duplicates)
        journal_usage = self.scalar("SELECT count(*) FROM journal_entries WHERE type = 'usage'")
        check.usage_records = self.scalar("SELECT count(*) FROM usage_records")
        check.journal_usage = journal_usage
        check.expired = self.scalar(
            "SELECT count(*) FROM journal_entries WHERE type = 'hold.expire'"
        )
        check.pending_debits = self.scalar("SELECT sum(debits_pending) FROM accounts")
        check.open_holds = self.scalar("SELECT count(*) FROM gateway_holds")
        check.balance_drop = self.start_posted - self.posted()
        check.expected_total = self.expected_total
        return check


@dataclass
class Check:
    phase: str
    ok_calls: int
    failed_calls: int
    settle_seconds: float
    journaled: int = 0
    lost: int = 0
    wrong: int = 0
    duplicates: int = 0
    unbilled_failures: int = 0
    billed_unknown: int = 0
    usage_records: int = 0
    journal_usage: int = 0
    expired: int = 0
    pending_debits: int = 0
    open_holds: int = 0
    expected_cost: int = 0
    expected_total: int = 0
    balance_drop: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not (
            self.lost
            or self.wrong
            or self.duplicates
            or self.billed_unknown
            or self.usage_records != self.journal_usage
            or self.expired
            or self.pending_debits
            or self.open_holds
            or self.balance_drop != self.expected_total
            or self.problems
        )

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict}: {self.ok_calls:,} successful calls, {self.journaled:,} with their usage "
            f"entry, {self.lost} lost, {self.wrong} billed wrong, {self.duplicates} "
            f"double-billed; journal usage entries {self.journal_usage:,} = usage_records "
            f"{self.usage_records:,}: {self.journal_usage == self.usage_records}; balance down "
            f"{self.balance_drop:,} CU, answers' usage costs {self.expected_total:,} CU; "
            f"pending debits {self.pending_debits}, open holds {self.open_holds}, expired "
            f"{self.expired}; failed calls {self.failed_calls} ({self.unbilled_failures} usage "
            f"entries at 0 CU, {self.billed_unknown} billed); settled "
            f"{self.settle_seconds:.2f} s after the last answer"
        )


# --- measurements -----------------------------------------------------------------------------


@dataclass
class Measurement:
    result: LoadResult
    window: Window

    @property
    def rate(self) -> float:
        return self.result.rate

    def p(self, q: float) -> float:
        """Latency quantile in ms."""
        return percentile(self.result.latencies, q) * 1000

    def cpu_ms_per_call(self, name: str) -> float:
        ok = self.result.ok
        return self.window.cpu.get(name, float("nan")) * 1000 / ok if ok else float("nan")

    def per_call(self, name: str) -> float:
        ok = self.result.ok
        return self.window.cpu.get(name, float("nan")) / ok if ok else float("nan")

    def cores(self, name: str) -> float:
        return self.window.cpu.get(name, 0.0) / self.result.seconds


@dataclass
class Series:
    phase: str
    target: str
    concurrency: int
    runs: list[Measurement] = field(default_factory=list)

    def med(self, f: Callable[[Measurement], float]) -> float:
        return median([f(m) for m in self.runs])

    @property
    def failed(self) -> collections.Counter[int]:
        total: collections.Counter[int] = collections.Counter()
        for m in self.runs:
            for status, n in m.result.statuses.items():
                if status != 200:
                    total[status] += n
        return +total


@dataclass
class Bench:
    args: argparse.Namespace
    engine: str
    ledger: Ledger
    servers: Hosts[Server]
    upstream: Upstream
    series: dict[tuple[str, str, int], Series] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)
    redis: list[dict[str, float]] = field(default_factory=list)  # per server, with Redis

    @property
    def redis_partial(self) -> bool:
        """A call limited without Redis (its round trip timed out: 50 ms, 300 ms while
        connecting) or refused by a limit (also among the non-200 answers)."""
        return any(r["fallbacks"] or r["refusals"] or r["up"] != r["up"] for r in self.redis)

    def redis_summary(self) -> str:
        return "; ".join(
            f"server {i + 1}: Redis up {r['up']:g}, {r['fallbacks']:g} calls limited without "
            f"Redis, {r['refusals']:g} refused by a limit"
            for i, r in enumerate(self.redis)
        )

    @property
    def hosts(self) -> int:
        return len(self.servers.servers)

    def meters(self) -> dict[str, Callable[[], dict[int, float]]]:
        meters = {
            "server": self.servers.cpu,  # every host's server and workers
            "upstream": lambda: tree_cpu(self.upstream.process.pid),
        }
        if self.engine == "postgresql":
            database = make_url(self.ledger.db.url).database
            meters["postgres"] = lambda: postgres_cpu(database)
            meters["pg_xacts"] = self.ledger.transactions
        return meters

    def measure(
        self,
        phase: str,
        target: Target,
        concurrency: int,
        seconds: float,
        parse: Callable[[int, bytes, bytes], Billed],
        record: bool,
        billed: list[Billed],
        failed: list[int],
    ) -> Measurement:
        after = self.ledger.wait_settled if target.name == "ubc" else None
        result, window = run_load(
            target.load(concurrency, seconds), parse, self.meters(), after=after
        )
        m = Measurement(result, window)
        if target.name == "ubc":
            billed.extend(result.parsed)
            failed.append(result.failed)
        label = "run" if record else "warm-up"
        bad = dict(sorted((s, n) for s, n in result.statuses.items() if s != 200))
        log(
            f"  {self.engine:<10} h={self.hosts} {phase:<6} {target.name:<6} c={concurrency:<3} "
            f"{label:<7} "
            f"{m.rate:8.0f}/s  p50 {m.p(0.5):7.2f} ms  p99 {m.p(0.99):7.2f} ms  "
            f"server {m.cpu_ms_per_call('server'):6.3f} ms/call  "
            f"postgres {m.cpu_ms_per_call('postgres'):6.3f} ms/call  "
            f"pg xacts {m.per_call('pg_xacts'):5.2f}/call  "
            f"cores: server {m.cores('server'):.2f} pg {m.cores('postgres'):.2f} "
            f"upstream {m.cores('upstream'):.2f} client {m.cores('client'):.2f} "
            f"machine {m.cores('machine'):.2f}" + (f"  NON-200: {bad}" if bad else "")
        )
        for error in result.errors[:5]:
            log(f"      ! {error}")
        if record:
            key = (phase, target.name, concurrency)
            self.series.setdefault(key, Series(phase, target.name, concurrency)).runs.append(m)
        return m

    def phase(
        self,
        phase: str,
        model: str,
        targets: list[Target],
        concurrencies: list[int],
        parse: Callable[[int, bytes, bytes], Billed],
    ) -> None:
        billed: list[Billed] = []
        failed: list[int] = []
        warm = self.args.warmup
        for c in concurrencies:
            for t in targets:
                self.measure(phase, t, c, warm, parse, False, billed, failed)
        for _ in range(self.args.runs):
            for c in concurrencies:
                for t in targets:
                    self.measure(phase, t, c, self.args.seconds, parse, True, billed, failed)
        check = self.ledger.check(phase, model, billed, sum(failed))
        self.checks.append(check)
        log(f"  {self.engine:<10} h={self.hosts} {phase:<6} billing check: {check.summary()}")
        for problem in check.problems[:10]:
            log(f"      ! {problem}")

    def run_profile(self, target: Target, parse: Callable[[int, bytes, bytes], Billed]) -> None:
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            log("  --profile: py-spy is not installed (pip install py-spy); skipped")
            return
        c = self.args.profile_concurrency
        out = Path(self.args.profile) / f"bench_gateway_{self.engine}_c{c}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        seconds = self.args.seconds
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(self.servers.servers[0].process.pid), "--gil"]
            + ["--format", "raw"]
            + ["--rate", "250", "--duration", str(int(seconds + 1)), "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(0.5)
            billed: list[Billed] = []
            failed: list[int] = []
            self.measure("chat", target, c, seconds, parse, False, billed, failed)
            _, err = spy.communicate(timeout=seconds + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        check = self.ledger.check("chat (profiled)", CHAT_MODEL, billed, sum(failed))
        self.checks.append(check)
        log(f"  {self.engine:<10} profile billing check: {check.summary()}")
        if not out.exists():
            log(f"  py-spy wrote nothing: {err[-500:]}")
            return
        self.profile = top_functions(out)
        for line in self.profile:
            log(f"    {line}")


def top_functions(path: Path, count: int = 20) -> list[str]:
    """Where the server's GIL time goes, from py-spy's collapsed stacks: the event loop
    against the worker threads (database units of work), the functions with the most
    self time, and ubc's own functions and the HTTP client's pool, inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        worker = frames[0].startswith("Thread._bootstrap")
        threads["worker threads (asyncio.to_thread)" if worker else "event loop"] += samples
        own[frames[-1]] += samples
        for name in set(frames):
            inclusive[name] += samples
    if not total:
        return ["(no samples)"]
    out = [
        f"py-spy record --gil: {total} samples of the thread holding the GIL; "
        + ", ".join(f"{name} {n / total:.0%}" for name, n in threads.most_common())
    ]
    out.append("self time:")
    out += [f"{n / total:6.1%}  {name}" for name, n in own.most_common(count)]
    out.append("inclusive (the function and what it calls), ubc and the upstream client:")
    shown = [
        (name, n)
        for name, n in inclusive.most_common()
        if ("ubc/" in name and "ubc/cli/" not in name and not name.startswith("<module>"))
        or name.startswith(("AsyncClient.send ", "AsyncConnectionPool."))
    ]
    out += [f"{n / total:6.1%}  {name}" for name, n in shown[: count + 10]]
    return out


def _frame_name(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module/path.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})" if file else name


def bench_engine(
    args: argparse.Namespace,
    children: Children,
    db: Database,
    upstream: Upstream,
    tmp: Path,
    hosts: int = 1,
) -> Bench:
    """Every phase on ``hosts`` servers; the upstream called directly too on one host only
    (it does not depend on ubc's hosts: measured once per run)."""
    redis_url = args.redis_url if args.hosts > 1 else None
    with running_servers(children, db, upstream, tmp, args.workers, hosts, redis_url) as servers:
        log(
            f"  {hosts} server(s) up at {', '.join(servers.urls)} (workers {args.workers} "
            f"each{', Redis ' + redis_url if redis_url else ''}); {args.members} member(s), "
            f"deposit {DEPOSIT:,} CU"
        )
        members = set_up_members(servers.servers[0], args.members, limited=bool(redis_url))
        keys = [m.secret for m in members]
        ledger = Ledger(db, members)
        bench = Bench(args, db.engine, ledger, servers, upstream)
        direct = hosts == 1

        def with_direct(target: Target, stream: bool) -> list[Target]:
            if not direct:
                return [target]
            body = chat_body(UPSTREAM_MODEL, stream)
            path = "/v1/chat/completions"
            return [target_for("direct", upstream.url, path, [UPSTREAM_KEY], [body]), target]

        try:
            phases = args.phases
            ubc_chat = target_for(
                "ubc", servers, "/v1/chat/completions", keys, [chat_body(CHAT_MODEL, False)]
            )
            if "chat" in phases:
                targets = with_direct(ubc_chat, False)
                bench.phase("chat", CHAT_MODEL, targets, args.concurrency, parse_chat)
            if "stream" in phases:
                ubc_stream = target_for(
                    "ubc", servers, "/v1/chat/completions", keys, [chat_body(CHAT_MODEL, True)]
                )
                targets = with_direct(ubc_stream, True)
                bench.phase("stream", CHAT_MODEL, targets, args.stream_concurrency, parse_stream)
            if "embed" in phases:
                bodies = [{"model": EMBED_MODEL, "input": s} for s in SENTENCES]
                target = target_for("ubc", servers, "/v1/embeddings", keys, bodies)
                bench.phase("embed", EMBED_MODEL, [target], args.embed_concurrency, parse_embedding)
            if args.profile and hosts == 1:
                bench.run_profile(ubc_chat, parse_chat)
        finally:
            ledger.close()
        if redis_url:
            bench.redis = [redis_use(server) for server in servers.servers]
            log(f"  {db.engine:<10} h={hosts} rate limits: {bench.redis_summary()}")
        problems = [line for server in servers.servers for line in server_log_problems(server)]
        if problems:
            log(f"  the server(s) logged {len(problems)} error line(s); the first:")
            for line in problems[:10]:
                log(f"      ! {line[:300]}")
        bench.log_problems = problems
    return bench


# --- reporting --------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"


def failures(series: list[Series]) -> str:
    total: collections.Counter[int] = collections.Counter()
    for s in series:
        total.update(s.failed)
    if not total:
        return "0"
    names = {-1: "no answer", -2: "bad 200"}
    return ", ".join(f"{n} × {names.get(s, s)}" for s, n in sorted(total.items()))


def added_p50(bench: Bench, phase: str, c: int, base: Bench | None = None) -> float:
    """Median over runs of ubc's p50 on ``bench`` minus the direct p50 (measured on
    ``base``, the one-host round, if given), run by run."""
    direct = (base or bench).series.get((phase, "direct", c))
    ubc = bench.series.get((phase, "ubc", c))
    if direct is None or ubc is None:
        return float("nan")
    pairs = zip(direct.runs, ubc.runs, strict=False)
    return median([u.p(0.5) - d.p(0.5) for d, u in pairs])


def chat_table(group: list[Bench], phase: str, concurrencies: list[int]) -> list[str]:
    """One row per concurrency and host count; the direct columns come from the one-host
    round (``group[0]``), where the upstream was called directly."""
    stream = phase == "stream"
    lat = "TTLB" if stream else "latency"
    base = group[0]
    lines = [
        f"| c | hosts | direct calls/s | direct {lat} p50 / p99 ms | ubc calls/s (runs) "
        f"| ubc {lat} p50 / p99 ms | added p50 ms | ubc CPU ms/call | PostgreSQL CPU ms/call "
        "| PostgreSQL transactions/call | upstream CPU ms/call (direct / via ubc) "
        "| non-200 (ubc) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in concurrencies:
        d = base.series.get((phase, "direct", c))
        for bench in group:
            u = bench.series.get((phase, "ubc", c))
            if d is None or u is None:
                continue
            rates = [m.rate for m in u.runs]
            lines.append(
                f"| {c} | {bench.hosts} | {d.med(lambda m: m.rate):,.0f} "
                f"| {fmt(d.med(lambda m: m.p(0.5)))} / {fmt(d.med(lambda m: m.p(0.99)))} "
                f"| {u.med(lambda m: m.rate):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) "
                f"| {fmt(u.med(lambda m: m.p(0.5)))} / {fmt(u.med(lambda m: m.p(0.99)))} "
                f"| {fmt(added_p50(bench, phase, c, base))} "
                f"| {fmt(u.med(lambda m: m.cpu_ms_per_call('server')), 3)} "
                f"| {fmt(u.med(lambda m: m.cpu_ms_per_call('postgres')), 3)} "
                f"| {fmt(u.med(lambda m: m.per_call('pg_xacts')))} "
                f"| {fmt(d.med(lambda m: m.cpu_ms_per_call('upstream')), 3)} / "
                f"{fmt(u.med(lambda m: m.cpu_ms_per_call('upstream')), 3)} "
                f"| {failures([u])} |"
            )
    return lines


def embed_table(group: list[Bench], concurrencies: list[int]) -> list[str]:
    lines = [
        "| c | hosts | embeddings/s (runs) | p50 / p99 ms | ubc CPU ms/call "
        "| PostgreSQL CPU ms/call | server cores | non-200 |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in concurrencies:
        for bench in group:
            u = bench.series.get(("embed", "ubc", c))
            if u is None:
                continue
            rates = [m.rate for m in u.runs]
            lines.append(
                f"| {c} | {bench.hosts} "
                f"| {u.med(lambda m: m.rate):,.1f} ({min(rates):,.1f}–{max(rates):,.1f}) "
                f"| {fmt(u.med(lambda m: m.p(0.5)))} / {fmt(u.med(lambda m: m.p(0.99)))} "
                f"| {fmt(u.med(lambda m: m.cpu_ms_per_call('server')), 3)} "
                f"| {fmt(u.med(lambda m: m.cpu_ms_per_call('postgres')), 3)} "
                f"| {fmt(u.med(lambda m: m.cores('server')))} | {failures([u])} |"
            )
    return lines


def scaling(
    group: list[Bench], phases: list[str], concurrencies: dict[str, list[int]]
) -> list[str]:
    """Per phase: each concurrency's median calls/s on N hosts over that on one host."""
    base = group[0]
    out = []
    for bench in group[1:]:
        for phase in phases:
            parts = []
            for c in concurrencies[phase]:
                one = base.series.get((phase, "ubc", c))
                many = bench.series.get((phase, "ubc", c))
                if one is None or many is None:
                    continue
                r1, rn = one.med(lambda m: m.rate), many.med(lambda m: m.rate)
                ratio = rn / r1 if r1 else float("nan")
                parts.append(
                    f"c={c} {rn:,.1f}/s over {r1:,.1f}/s = {fmt(ratio)}x (p50 "
                    f"{fmt(many.med(lambda m: m.p(0.5)))} vs {fmt(one.med(lambda m: m.p(0.5)))} ms)"
                )
            if parts:
                out.append(
                    f"- scaling, {bench.engine} {phase}: {bench.hosts} hosts over 1 host: "
                    + "; ".join(parts)
                )
    return out


def targets(bench: Bench) -> list[str]:
    out = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    if ("chat", "ubc", 1) in bench.series:
        added = added_p50(bench, "chat", 1)
        out.append(
            f"- at concurrency 1, added p50 ≤ {TARGET_ADDED_P50_C1_MS:g} ms: "
            f"{fmt(added)} ms, {verdict(added <= TARGET_ADDED_P50_C1_MS)}"
        )
    cpu = {
        c: s.med(lambda m: m.cpu_ms_per_call("server"))
        for (phase, name, c), s in bench.series.items()
        if phase == "chat" and name == "ubc"
    }
    if cpu:
        shown = ", ".join(f"{fmt(v, 3)} ms at c={c}" for c, v in sorted(cpu.items()))
        worst = max(cpu.values())
        out.append(
            f"- ubc CPU per metered call ≤ {TARGET_CPU_PER_CALL_MS:g} ms (non-streaming, every "
            f"concurrency): {shown}; {verdict(worst <= TARGET_CPU_PER_CALL_MS)}"
        )
    if ("chat", "ubc", 50) in bench.series:
        rate = bench.series[("chat", "ubc", 50)].med(lambda m: m.rate)
        added = added_p50(bench, "chat", 50)
        out.append(
            f"- at concurrency 50, ≥ {TARGET_C50_RATE:,.0f} calls/s through ubc: {rate:,.0f}/s, "
            f"{verdict(rate >= TARGET_C50_RATE)}; added p50 ≤ {TARGET_ADDED_P50_C50_MS:g} ms: "
            f"{fmt(added)} ms, {verdict(added <= TARGET_ADDED_P50_C50_MS)}"
        )
    all_ok = all(c.passed for c in bench.checks)
    out.append(
        f"- no lost or double-billed call: {verdict(all_ok)} "
        f"({sum(c.ok_calls for c in bench.checks):,} successful calls through ubc checked, "
        f"{sum(c.lost for c in bench.checks)} lost, "
        f"{max((c.duplicates for c in bench.checks), default=0)} double-billed, "
        f"{sum(c.wrong for c in bench.checks)} billed a wrong amount)"
    )
    return out


def report(args: argparse.Namespace, benches: list[Bench], facts: dict[str, Any]) -> str:
    nproc = len(os.sched_getaffinity(0))
    lines = [
        f"- date: {facts['started']:%Y-%m-%d %H:%M} UTC",
        f"- command: `python {' '.join([sys.argv[0], *sys.argv[1:]])}`",
        f"- code: {facts['code']}",
        f"- CPU: {cpu_model()}, nproc {nproc}, RAM {ram_gib():.0f} GiB; load average (1, 5, "
        f"15 min): {facts['load_before']} before, {loadavg()} after",
        f"- Python {platform.python_version()}, uvicorn {version('uvicorn')}, "
        f"FastAPI {version('fastapi')}, httpx {version('httpx')}, "
        f"SQLAlchemy {version('sqlalchemy')}, psycopg {version('psycopg')}"
        + (f", uvloop {version('uvloop')}" if uvloop is not None else ""),
    ]
    for engine, (server_version, settings) in facts["databases"].items():
        name = "PostgreSQL" if engine == "postgresql" else "SQLite"
        lines.append(f"- {name} {server_version}: {settings}")
    lines += [
        f"- upstream: `tests/upstream.py --latency-ms {args.latency_ms:g}` (its own process, "
        f"uvloop), {OUTPUT_TOKENS} output tokens per answer; "
        f"ubc: `ubc serve --workers {args.workers}`, "
        f"metering and journaling on, {args.members} member(s) with one API key each ("
        + ("limits never reached" if args.hosts > 1 else "no rate limit")
        + ", no spend cap); price 1,000 / 2,000 CU per 1K input / output tokens",
        "- load: one process, one keep-alive HTTP/1.1 connection per concurrent client "
        "(asyncio streams" + (", uvloop" if uvloop is not None else "") + "), closed loop; "
        f"warm-up {args.warmup:g} s per row, then {args.runs} run(s) of {args.seconds:g} s, "
        "direct and ubc alternating; medians over runs (added p50: median of each run's "
        "ubc p50 − direct p50)",
        "- CPU per call: user + system seconds of the process ÷ successful calls, from the "
        "moment every client is connected until the last answer and every hold is settled "
        "(so the usage entries written after the answers count); PostgreSQL = the backends "
        "of the benchmark's database and the server's background processes (WAL writer, "
        "checkpointer...), not other databases' backends; PostgreSQL transactions per call: "
        "from `pg_stat_database` (approximate: its counts arrive up to a second late). "
        f"Clients, upstream, ubc and PostgreSQL share the same {nproc} cores.",
        f"- for scale: {LITELLM}",
    ]
    concurrencies = {
        "chat": args.concurrency,
        "stream": args.stream_concurrency,
        "embed": args.embed_concurrency,
    }
    lines.append(
        "- spare holds (`UBC_GATEWAY_SPARE_HOLDS`): "
        + ("on (`--spare-holds`)" if args.spare_holds else "off (the default)")
    )
    if args.hosts > 1:
        lines.append(
            f"- hosts: every phase on 1 server, then on {args.hosts} servers (separate `ubc "
            f"serve --workers {args.workers}` processes on their own ports, one fresh database "
            "each round, clients spread evenly: client i talks to server i mod N), both rounds "
            f"with `UBC_REDIS_URL={args.redis_url}` and keys limited to {KEY_RPM:,} rpm and "
            f"{KEY_TPM:,} tpm (checked in Redis on every call, never reached); the upstream is "
            "called directly in the one-host round only (its columns repeat in the N-host "
            f"rows). The servers share the same {nproc} cores with each other, the clients, "
            "the upstream, PostgreSQL and Redis: the ratio shows what N hosts cost in "
            "coordination on one machine, not what N machines would add"
        )
    for engine in dict.fromkeys(b.engine for b in benches):
        group = sorted((b for b in benches if b.engine == engine), key=lambda b: b.hosts)
        base = group[0]
        lines += ["", f"#### {engine}", ""]
        if any(k[0] == "chat" for k in base.series):
            lines += ["Non-streaming chat completions:", ""]
            lines += chat_table(group, "chat", args.concurrency)
            lines.append("")
        if any(k[0] == "stream" for k in base.series):
            lines += [
                f"Streaming (`stream_options.include_usage`, {OUTPUT_TOKENS} token chunks), "
                "time to last byte:",
                "",
            ]
            lines += chat_table(group, "stream", args.stream_concurrency)
            lines.append("")
        if any(k[0] == "embed" for k in base.series):
            lines += [
                f"Local embeddings (`{EMBED_MODEL}`, one short sentence per call) through ubc:",
                "",
            ]
            lines += embed_table(group, args.embed_concurrency)
            lines.append("")
        if len(group) > 1:
            lines += ["Scaling (median calls/s through ubc):", ""]
            lines += scaling(group, args.phases, concurrencies)
            lines.append("")
        lines.append("Billing checks (after each phase, cumulative per round):")
        lines.append("")
        for bench in group:
            on = f" ({bench.hosts} host{'s' if bench.hosts > 1 else ''})" if len(group) > 1 else ""
            for check in bench.checks:
                lines.append(f"- {check.phase}{on}: {check.summary()}")
            problems = bench.log_problems
            lines.append(
                f"- server log{on}: {len(problems)} error line(s)"
                + (f", the first: `{problems[0][:200]}`" if problems else "")
            )
            if bench.redis:
                verdict = "not every call" if bench.redis_partial else "every call"
                lines.append(f"- rate limits in Redis{on}: {verdict}: {bench.redis_summary()}")
        lines += ["", "Targets (issue 6" + (", one host" if len(group) > 1 else "") + "):", ""]
        lines += targets(base)
    return "\n".join(lines)


def code_version() -> str:
    """The commit of the code measured, and any uncommitted change under ubc/."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %ci"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "ubc"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    if not changed:
        return f"commit {commit}, no uncommitted change under ubc/"
    return f"commit {commit} with uncommitted changes in {', '.join(changed)}"


def redis_problem(url: str) -> str | None:
    """Why Redis at ``url`` cannot be used, or None when it answers PING."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
    except (redis.RedisError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="postgresql", help="comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs of every row (median)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per row")
    parser.add_argument("--concurrency", type=int_list, default=[1, 50, 200])
    parser.add_argument("--stream-concurrency", type=int_list, default=[1, 50])
    parser.add_argument("--embed-concurrency", type=int_list, default=[1, 4])
    parser.add_argument("--phases", default="chat,stream,embed", help="comma-separated")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="the upstream's latency")
    parser.add_argument("--members", type=int, default=1, help="members (clients spread)")
    parser.add_argument(
        "--workers", type=int, default=1, help="ubc serve worker processes (CPU: all of them)"
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="N > 1: every phase on 1 server, then on N servers sharing the database and Redis",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="UBC_REDIS_URL of every server when --hosts > 1 (shared rate limits)",
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy one more chat run; collapsed stacks to DIR"
    )
    parser.add_argument("--profile-concurrency", type=int, default=50)
    parser.add_argument(
        "--spare-holds",
        action="store_true",
        help="serve with UBC_GATEWAY_SPARE_HOLDS=1 (lone callers' next hold placed ahead)",
    )
    args = parser.parse_args(argv)
    global SPARE_HOLDS
    SPARE_HOLDS = args.spare_holds
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine not in ("sqlite", "postgresql"):
            parser.error(f"unknown engine {engine!r}: choose from sqlite, postgresql")
    for phase in args.phases:
        if phase not in ("chat", "stream", "embed"):
            parser.error(f"unknown phase {phase!r}: choose from chat, stream, embed")
    if args.members < 1 or args.runs < 1:
        parser.error("--members and --runs must be at least 1")
    if args.hosts < 1:
        parser.error("--hosts must be at least 1")
    if args.hosts > 1:
        problem = redis_problem(args.redis_url)
        if problem:
            parser.error(f"--hosts {args.hosts} needs Redis at {args.redis_url}: {problem}")

    # Ctrl-C (even if the shell started us ignoring it) and SIGTERM unwind the same way:
    # load generator, server and upstream stopped, the PostgreSQL database dropped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    facts: dict[str, Any] = {
        "started": datetime.now(UTC),
        "load_before": loadavg(),
        "code": code_version(),
        "databases": {},
    }
    children = Children()
    benches = []
    try:
        upstream = start_upstream(children, args.latency_ms)
        log(f"upstream at {upstream.url} (latency {args.latency_ms:g} ms)")
        for engine, hosts in [(e, h) for e in engines for h in sorted({1, args.hosts})]:
            log(f"{engine}, {hosts} host(s): fresh database and data dir")
            with (
                tempfile.TemporaryDirectory(prefix="ubc-bench-gateway-") as tmp,
                fresh_database(
                    engine, args.postgres_url, Path(tmp), f"ubc_bench_gateway_{os.getpid()}"
                ) as db,
            ):
                facts["databases"][engine] = (db.server_version, db.settings)
                benches.append(bench_engine(args, children, db, upstream, Path(tmp), hosts))
    finally:
        children.stop_all()
    print(report(args, benches, facts))
    if any(b.profile for b in benches):
        print()
        for b in benches:
            if b.profile:
                print(f"<!-- {b.engine} server profile at c={args.profile_concurrency} -->")
                print("```")
                print("\n".join(b.profile))
                print("```")
    for b in benches:
        bad = failures(list(b.series.values()))
        if bad != "0":
            log(f"NON-200 ANSWERS on {b.engine}, {b.hosts} host(s) (measured runs): {bad}")
        if b.log_problems:
            log(f"SERVER LOG on {b.engine}, {b.hosts} host(s): {len(b.log_problems)} error line(s)")
    for b in benches:
        if b.redis_partial:
            log(
                f"RATE LIMITS NOT ALL IN REDIS on {b.engine}, {b.hosts} host(s): "
                f"{b.redis_summary()}"
            )
    failed = [c for b in benches for c in b.checks if not c.passed]
    if failed:
        log(f"BILLING CHECK FAILED in {len(failed)} phase(s): see above")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the server and upstream were stopped and the database dropped")
        sys.exit(130)
