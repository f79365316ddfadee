"""Prometheus metrics (issue 17): every metric of ubc defined once, the helpers the code
calls where things happen, the collector that reads the ledger's state at scrape time,
and the exposition of ``GET /metrics``.

Two kinds of metric:

- **events**, counted where they happen (the write path, the gateway, the sweeper):
  counters and histograms of prometheus-client, defined below at import;
- **state**, read from the database when ``/metrics`` is scraped, by
  :class:`StateCollector`: one cheap query each (the journal's head row, the latest
  entry by primary key, the partial index of open holds, the latest epoch by primary
  key), except the per-asset balance sums, which read every account and are therefore
  computed at most every ``UBC_METRICS_BALANCE_INTERVAL_SECONDS`` (30 s) per process and
  served from that cache in between.

With several worker processes (``ubc serve --workers N``) prometheus-client runs in its
multiprocess mode: ``ubc serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh private
directory (:func:`prepare_multiprocess_dir`) before any worker starts, each worker's
counters and histograms live in files there, and a scrape (answered by any one worker)
sums them with ``MultiProcessCollector``. The state collector is not registered in any
global registry: :func:`exposition` runs it once per scrape, whichever the mode.

This module imports no web framework: the write path (``ubc.envelopes``) imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session, sessionmaker

from ubc.dbtypes import UTCDateTime

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Set by ``ubc serve`` (``ubc.serving.run``) for its workers: the address it listens on,
#: which ``UBC_METRICS_ACCESS=auto`` reads.
BIND_HOST_ENV = "UBC_SERVE_BIND_HOST"
#: The text format 0.0.4 (what generate_latest writes; every Prometheus reads it).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# --- event metrics ---------------------------------------------------------------------

ENVELOPES_ACCEPTED = Counter(
    "ubc_envelopes_accepted_total",
    "Envelopes applied (201) or answered as a replay of an accepted one (200) by the "
    "group-commit writer, by payload type: those of clients and the gateway's usage "
    "entries (the background expiries and epoch steps are journaled without it)",
    ["type", "status"],
)
ENVELOPES_REFUSED = Counter(
    "ubc_envelopes_refused_total",
    "Envelopes refused, by payload type (`invalid` when it could not be decoded) and HTTP status",
    ["type", "status"],
)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
WRITER_BATCH_SIZE = Histogram(
    "ubc_writer_batch_size",
    "Items applied per group commit (envelopes, or holds of model calls)",
    ["writer"],
    buckets=_BATCH_BUCKETS,
)
WRITER_COMMIT_SECONDS = Histogram(
    "ubc_writer_commit_seconds",
    "Time to apply and commit one group-commit batch",
    ["writer"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_CALLS = Counter(
    "ubc_model_calls_total",
    "Calls of the metered model endpoint (/v1/chat/completions, /v1/embeddings) by model "
    "(`none` before a model of the catalog is known) and HTTP status",
    ["model", "status"],
)
MODEL_TOKENS = Counter(
    "ubc_model_tokens_total",
    "Tokens billed, by model and kind (prompt, completion)",
    ["model", "kind"],
)
MODEL_BILLED_CU = Counter(
    "ubc_model_billed_cu_total",
    "Compute units billed for model calls, by model",
    ["model"],
)
UPSTREAM_SECONDS = Histogram(
    "ubc_upstream_request_duration_seconds",
    "Time from sending a call to an upstream model server to its answer (whole answer; "
    "headers of a stream), by model",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
UPSTREAM_ERRORS = Counter(
    "ubc_upstream_errors_total",
    "Upstream calls that failed (answered 502), by model and kind (upstream_unavailable, "
    "upstream_timeout, upstream_disconnected, upstream_<HTTP status>, upstream)",
    ["model", "kind"],
)
RATELIMIT_REFUSALS = Counter(
    "ubc_ratelimit_refusals_total",
    "Model calls refused 429 by a rate limit (requests or tokens per minute), by model",
    ["model"],
)
HOLDS_EXPIRED = Counter(
    "ubc_holds_expired_total",
    "Holds released by the expiry sweeper (model calls' hold.expire and other holds)",
)
WITNESS_REQUESTS = Counter(
    "ubc_witness_requests_total",
    "add-checkpoint calls to the ledger's witnesses, by witness name and outcome: the HTTP "
    "status, `bad_cosignature` (a 200 whose cosignature did not verify: not stored), "
    "`timeout` or `unreachable`",
    ["witness", "status"],
)

BACKGROUND_LEADER = Gauge(
    "ubc_background_leader",
    "1 where this process (with several workers: one of them) leads the background job "
    "`job` (holds its leader lock: ubc.db.leader), else 0; over all hosts, 1 for each job",
    ["job"],
    multiprocess_mode="livemax",
)


def set_leader(job: str, leading: bool) -> None:
    """Whether this process leads the background job ``job`` (see ``ubc.db.leader``)."""
    BACKGROUND_LEADER.labels(job).set(1 if leading else 0)


REPLICA_READS = Counter(
    "ubc_replica_reads_total",
    "Reads served by the read replica (UBC_READ_DATABASE_URL)",
)
REPLICA_FALLBACKS = Counter(
    "ubc_replica_fallbacks_total",
    "Reads meant for the read replica that the primary served, by reason: behind (the "
    "replica had not replayed the journal size the read asked for) or down (unreachable)",
    ["reason"],
)
for _reason in ("behind", "down"):  # a series that exists (at 0) is alertable
    REPLICA_FALLBACKS.labels(_reason)

#: The label of a refused envelope whose type could not be read.
INVALID_TYPE = "invalid"
NO_MODEL = "none"


class _Receipt(Protocol):
    type: str


def observe_commit(
    raws: Sequence[object], outcomes: Sequence[object], started: float, writer: str = "envelopes"
) -> None:
    """One group commit of the envelope writer: its size, its latency and each outcome
    (an ``Accepted`` with its receipt, or a ``UbcError``)."""
    WRITER_COMMIT_SECONDS.labels(writer).observe(time.perf_counter() - started)
    WRITER_BATCH_SIZE.labels(writer).observe(len(outcomes))
    # Counted per (type, status) first: one increment per distinct pair, not per envelope
    # (0.3 ms for a batch of 1,000 transfers instead of 1.3).
    accepted: dict[tuple[str, int], int] = {}
    refused: dict[tuple[str, int], int] = {}
    for raw, outcome in zip(raws, outcomes, strict=False):
        receipt: _Receipt | None = getattr(outcome, "receipt", None)
        if receipt is not None:
            key = (receipt.type, getattr(outcome, "status_code", 201))
            accepted[key] = accepted.get(key, 0) + 1
        else:
            key = (_type_of(raw), getattr(outcome, "status_code", 500))
            refused[key] = refused.get(key, 0) + 1
    for (kind, status), count in accepted.items():
        ENVELOPES_ACCEPTED.labels(kind, str(status)).inc(count)
    for (kind, status), count in refused.items():
        ENVELOPES_REFUSED.labels(kind, str(status)).inc(count)


def observe_failed_commit(raws: Sequence[object], error: BaseException) -> None:
    """A group commit that applied nothing (an atomic batch refused whole, the database
    unavailable): every envelope in it refused with the error's status."""
    status = str(getattr(error, "status_code", 500))
    kinds: dict[str, int] = {}
    for raw in raws:
        kind = _type_of(raw)
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, count in kinds.items():
        ENVELOPES_REFUSED.labels(kind, status).inc(count)


def observe_batch(writer: str, size: int, started: float) -> None:
    """One group commit of another writer (the gateway's holds)."""
    WRITER_BATCH_SIZE.labels(writer).observe(size)
    WRITER_COMMIT_SECONDS.labels(writer).observe(time.perf_counter() - started)


def observe_billing(model: str, input_tokens: int, output_tokens: int, cost: int) -> None:
    """What one settled model call is billed (nothing for a released one)."""
    if input_tokens:
        MODEL_TOKENS.labels(model, "prompt").inc(input_tokens)
    if output_tokens:
        MODEL_TOKENS.labels(model, "completion").inc(output_tokens)
    if cost:
        MODEL_BILLED_CU.labels(model).inc(cost)


def _type_of(raw: object) -> str:
    """The payload type of a prechecked envelope, if it was decoded."""
    decoded = getattr(raw, "decoded", None)
    kind = getattr(decoded, "type", None)
    return kind if isinstance(kind, str) else INVALID_TYPE


# --- state metrics, read at scrape time ------------------------------------------------

#: Epoch statuses, each a series of ``ubc_epoch_status`` (1 for the latest epoch's).
EPOCH_STATUSES = ("opening", "open", "closing", "closed")


@dataclass(slots=True)
class _BalanceSums:
    at: float  # time.monotonic() when computed
    rows: list[tuple[str, int, int]]
    seconds: float  # how long the query took


class ReplicaState(Protocol):
    """The read replica as seen at scrape time (``ubc.db.replica.ReplicaStatus``)."""

    @property
    def up(self) -> bool: ...
    @property
    def paused(self) -> bool: ...
    @property
    def lag_entries(self) -> int | None: ...
    @property
    def lag_seconds(self) -> float | None: ...
    @property
    def replay_lag_seconds(self) -> float | None: ...


def _replica_families(state: ReplicaState) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "ubc_replica_up", "Whether the read replica answered", value=1 if state.up else 0
    )
    if not state.up:
        return
    yield GaugeMetricFamily(
        "ubc_replica_replay_paused",
        "Whether replay is paused on the replica",
        value=1 if state.paused else 0,
    )
    if state.lag_entries is not None:
        yield GaugeMetricFamily(
            "ubc_replica_lag_entries",
            "Journal entries on the primary not yet replayed by the read replica",
            value=state.lag_entries,
        )
    if state.lag_seconds is not None:
        yield GaugeMetricFamily(
            "ubc_replica_lag_seconds",
            "Age (the ledger's clock) of the oldest journal entry the read replica has not "
            "replayed yet; 0 when it has them all",
            value=state.lag_seconds,
        )
    if state.replay_lag_seconds is not None:
        yield GaugeMetricFamily(
            "ubc_replica_replay_lag_seconds",
            "PostgreSQL replay lag of the read replica: 0 when it has replayed all it "
            "received, else the age of the latest transaction it replayed "
            "(pg_last_xact_replay_timestamp; an upper bound after a quiet period)",
            value=state.replay_lag_seconds,
        )


class StateCollector:
    """Reads the ledger's state when collected (once per scrape; see :func:`exposition`).

    ``now`` is the ledger's clock (the checkpoint's age is measured in the ledger's time).
    A failed query does not fail the scrape: ``ubc_metrics_database_up`` is 0 instead.
    ``replica``, when a read replica is configured, reads its state and lag (the
    ``ubc_replica_*`` gauges).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        now: Callable[[], datetime],
        *,
        balance_interval: float = 30.0,
        replica: Callable[[], ReplicaState] | None = None,
    ) -> None:
        self.sessions = sessions
        self.now = now
        self.balance_interval = balance_interval
        self.replica = replica
        self._balances: _BalanceSums | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        if self.replica is not None:
            yield from _replica_families(self.replica())
        try:
            with self.sessions() as session:
                families = list(self._state(session))
            families.extend(self._balance_families())
        except Exception:  # the database is unreachable: say so, and serve the rest
            yield GaugeMetricFamily(
                "ubc_metrics_database_up", "Whether the state metrics could be read", value=0
            )
            return
        yield GaugeMetricFamily(
            "ubc_metrics_database_up", "Whether the state metrics could be read", value=1
        )
        yield from families

    def _state(self, session: Session) -> Iterator[Metric]:
        now = self.now()
        size = session.execute(text("SELECT size FROM journal_head WHERE id = 1")).scalar()
        size = int(size or 0)
        yield GaugeMetricFamily("ubc_journal_size", "Entries in the journal", value=size)
        if size:
            # The checkpoint is re-signed with every batch: its time is the latest entry's.
            committed = session.execute(
                text("SELECT committed_at FROM journal_entries WHERE seq = :seq").columns(
                    committed_at=UTCDateTime()
                ),
                {"seq": size - 1},
            ).scalar()
            if isinstance(committed, datetime):
                yield GaugeMetricFamily(
                    "ubc_journal_checkpoint_age_seconds",
                    "Seconds since the latest checkpoint (the latest entry) was committed",
                    value=max(0.0, (now - committed).total_seconds()),
                )
        # Open holds: the partial index of pending transfers (ix_transfers_open_holds).
        count = GaugeMetricFamily("ubc_holds_open", "Open (pending) holds", labels=["asset"])
        amount = GaugeMetricFamily(
            "ubc_holds_open_amount", "Amount reserved by open holds", labels=["asset"]
        )
        held = {
            str(row.asset): (int(row.n), int(row.total))
            for row in session.execute(
                text(
                    "SELECT asset, count(*) AS n, coalesce(sum(amount), 0) AS total "
                    "FROM transfers WHERE state = 'pending' GROUP BY asset"
                )
            )
        }
        # Every asset (a few rows), 0 without open holds: a series that exists is alertable.
        assets = session.execute(text("SELECT code FROM assets")).scalars()
        for asset in sorted({str(code) for code in assets} | set(held)):
            n, total = held.get(asset, (0, 0))
            count.add_metric([asset], n)
            amount.add_metric([asset], total)
        yield count
        yield amount
        overdue = session.execute(
            text(
                "SELECT count(*) FROM transfers WHERE state = 'pending' AND timeout_at <= :now"
            ).bindparams(bindparam("now", type_=UTCDateTime())),
            {"now": now},
        ).scalar()
        yield GaugeMetricFamily(
            "ubc_holds_overdue",
            "Open holds past their timeout, not yet released by the sweeper",
            value=int(overdue or 0),
        )
        yield from self._epoch(session)
        yield from self._witnesses(session)

    def _witnesses(self, session: Session) -> Iterator[Metric]:
        """Per witness of the ledger (``journal_witnesses``), the largest checkpoint size
        it cosigned; nothing when no witness is configured."""
        rows = session.execute(
            text("SELECT witness, cosigned_size FROM journal_witnesses ORDER BY witness")
        ).all()
        if not rows:
            return
        cosigned = GaugeMetricFamily(
            "ubc_witness_cosigned_size",
            "The largest checkpoint size each witness cosigned (0: none yet), by witness name",
            labels=["witness"],
        )
        for vkey, size in rows:
            cosigned.add_metric([str(vkey).split("+", 1)[0]], int(size or 0))
        yield cosigned

    def _epoch(self, session: Session) -> Iterator[Metric]:
        row = session.execute(
            text(
                "SELECT number, status, members, applied, expired_members, opened_at "
                "FROM epochs ORDER BY number DESC LIMIT 1"
            ).columns(opened_at=UTCDateTime())
        ).first()
        if row is None:
            return
        yield GaugeMetricFamily("ubc_epoch_number", "The latest epoch", value=int(row.number))
        status = GaugeMetricFamily(
            "ubc_epoch_status", "The latest epoch's status (1 for its status)", labels=["status"]
        )
        for name in EPOCH_STATUSES:
            status.add_metric([name], 1 if row.status == name else 0)
        yield status
        yield GaugeMetricFamily(
            "ubc_epoch_members", "Members the latest epoch allocates to", value=int(row.members)
        )
        yield GaugeMetricFamily(
            "ubc_epoch_allocations_applied",
            "Allocations of the latest epoch applied so far (= members once open)",
            value=int(row.applied),
        )
        yield GaugeMetricFamily(
            "ubc_epoch_close_members_expired",
            "Members whose balance the latest epoch's close has expired so far",
            value=int(row.expired_members),
        )
        if isinstance(row.opened_at, datetime):
            yield GaugeMetricFamily(
                "ubc_epoch_opened_timestamp_seconds",
                "When the latest epoch was opened (Unix time, the ledger's clock)",
                value=row.opened_at.timestamp(),
            )

    def _balance_families(self) -> Iterator[Metric]:
        sums = self._balance_sums()
        posted = GaugeMetricFamily(
            "ubc_ledger_balance_sum",
            "Sum of all accounts' posted balances (credits - debits) per asset: 0 in a "
            "healthy ledger",
            labels=["asset"],
        )
        pending = GaugeMetricFamily(
            "ubc_ledger_pending_balance_sum",
            "Sum of all accounts' pending balances per asset: 0 in a healthy ledger",
            labels=["asset"],
        )
        for asset, posted_sum, pending_sum in sums.rows:
            posted.add_metric([asset], posted_sum)
            pending.add_metric([asset], pending_sum)
        yield posted
        yield pending
        yield GaugeMetricFamily(
            "ubc_ledger_balance_sum_age_seconds",
            "Age of the balance sums above (computed at most every "
            "UBC_METRICS_BALANCE_INTERVAL_SECONDS)",
            value=time.monotonic() - sums.at,
        )
        yield GaugeMetricFamily(
            "ubc_ledger_balance_sum_query_seconds",
            "How long the balance sums' query (every account) took when last computed",
            value=sums.seconds,
        )

    def _balance_sums(self) -> _BalanceSums:
        """The per-asset sums, cached: the query reads every account."""
        with self._lock:  # concurrent scrapes compute it once
            cached = self._balances
            if cached is not None and time.monotonic() - cached.at < self.balance_interval:
                return cached
            started = time.monotonic()
            with self.sessions() as session:
                rows = [
                    (str(row[0]), int(row[1] or 0), int(row[2] or 0))
                    for row in session.execute(
                        text(
                            "SELECT asset, sum(credits_posted - debits_posted), "
                            "sum(credits_pending - debits_pending) FROM accounts GROUP BY asset"
                        )
                    )
                ]
            done = time.monotonic()
            self._balances = _BalanceSums(done, rows, done - started)
            return self._balances


# --- exposition ------------------------------------------------------------------------


class _Collectors:
    """Several collectors as one, for a registry made for one scrape."""

    def __init__(self, collectors: Iterable[Any]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def multiprocess_dir() -> str | None:
    """The multiprocess directory of this process, if prometheus-client runs in that mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def exposition(state: StateCollector | None) -> bytes:
    """The text of one scrape: every event metric (all workers' in multiprocess mode,
    else this process's default registry, which other modules' metrics share) and the
    state collector's, run once."""
    path = multiprocess_dir()
    events: Any = MultiProcessCollector(None, path=path) if path else REGISTRY  # type: ignore[no-untyped-call]
    # auto_describe=False: registering does not run the collectors (the state queries).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collectors([events, *([state] if state is not None else [])]))
    return generate_latest(registry)


def prepare_multiprocess_dir() -> Path:
    """A fresh private directory (0700) for the workers' metric files, exported in
    ``PROMETHEUS_MULTIPROC_DIR`` before the workers start (they inherit it). Any value
    inherited from the environment is replaced: files of an earlier run would be summed
    with this one's."""
    path = Path(tempfile.mkdtemp(prefix="ubc-metrics-"))  # mode 0700, empty
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def remove_multiprocess_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == str(path):
        del os.environ[MULTIPROC_ENV]


def worker_exited(pid: int | None) -> None:
    """Bookkeeping for a worker that exited (its live gauges stop counting)."""
    path = multiprocess_dir()
    if path and pid is not None:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
