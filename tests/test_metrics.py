"""``GET /metrics`` (issue 17): names and values after a known sequence of operations on a
served ledger (envelopes, a model call through the official ``openai`` SDK, a 429, an
upstream failure), the access setting, the shipped alert rules and dashboard, and a real
``ubc serve --workers 2`` whose workers' counters are summed.

Counters of in-thread servers live in this process's default registry, shared by every
test: the assertions are on increments between two scrapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import _free_port, make_data_dir, run_server
from tests.test_epochs import served
from tests.test_gateway import Env, env  # noqa: F401 - the fixture, shared
from ubc import metrics
from ubc.client import UbcApiError, UbcClient
from ubc.signing import generate_signing_key

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = None) -> Samples:
    """Every sample of ``GET /metrics``: (name, sorted labels) → value."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    # A new connection each time: with several workers, any of them answers.
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_after_a_known_sequence(env: Env) -> None:  # noqa: F811 - the fixture
    url = env.server.url
    before = scrape(url)
    receipts = []
    alice = UbcClient(url, key=generate_signing_key())
    bob = UbcClient(url, key=generate_signing_key())
    env.clients += [alice, bob]
    receipts.append(alice.register("alice"))
    receipts.append(bob.register("bob"))
    receipts.append(env.operator.admit("alice", "basic"))
    receipts.append(env.operator.admit("bob", "basic"))
    receipts.append(env.operator.deposit("alice", 1000, external_ref="seed-alice"))
    receipts.append(alice.send("bob", 100))
    with pytest.raises(UbcApiError) as refused:
        alice.send("bob", 10**9)  # more than alice has
    assert refused.value.status == 409
    # An atomic batch that cannot apply whole: both its envelopes refused, 409.
    transfer = {"from_": alice.address, "to": "member:bob", "asset": "CU"}
    with pytest.raises(UbcApiError) as batch_refused:
        alice.submit_batch(
            [
                alice.envelope("transfer", amount=1, **transfer),
                alice.envelope("transfer", amount=10**9, **transfer),
            ],
            atomic=True,
        )
    assert batch_refused.value.status == 409
    secret, receipt = alice.grant_api_key("sdk")
    receipts.append(receipt)
    sdk = env.sdk(secret)
    answer = sdk.chat.completions.create(
        model="chat-small", messages=[{"role": "user", "content": "say five words please"}]
    )
    assert answer.usage is not None
    prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
    for _ in range(2):
        sdk.chat.completions.create(
            model="chat-limited", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(
            model="chat-limited", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    with pytest.raises(openai.InternalServerError):  # the upstream answers 500: a 502
        sdk.chat.completions.create(
            model="chat-fail-500", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    env.settled()
    after = scrape(url)

    # Envelopes: each accepted one by its type and 201, the refused transfer 409.
    sent = Counter(r["type"] for r in receipts)
    for kind, count in sent.items():
        assert delta(before, after, "ubc_envelopes_accepted_total", type=kind, status="201") == (
            count
        ), kind
    refusals = delta(before, after, "ubc_envelopes_refused_total", type="transfer", status="409")
    assert refusals == 1 + 2
    # The server's own usage entries (one per call that held: 4) went through the writer.
    assert delta(before, after, "ubc_envelopes_accepted_total", type="usage", status="201") == 4
    batches = total(after, "ubc_writer_batch_size_count", writer="envelopes") - total(
        before, "ubc_writer_batch_size_count", writer="envelopes"
    )
    assert 1 <= batches <= len(receipts) + 1 + 4
    assert (
        total(after, "ubc_writer_batch_size_sum", writer="envelopes")
        - total(before, "ubc_writer_batch_size_sum", writer="envelopes")
        == len(receipts) + 1 + 4
    )
    assert delta(before, after, "ubc_writer_commit_seconds_count", writer="envelopes") == batches
    assert delta(before, after, "ubc_writer_batch_size_sum", writer="holds") == 4

    # Model calls by model and status; tokens and CU billed; the 429; the upstream error.
    calls = "ubc_model_calls_total"
    assert delta(before, after, calls, model="chat-small", status="200") == 1
    assert delta(before, after, calls, model="chat-limited", status="200") == 2
    assert delta(before, after, calls, model="chat-limited", status="429") == 1
    assert delta(before, after, calls, model="chat-fail-500", status="502") == 1
    tokens = "ubc_model_tokens_total"
    assert delta(before, after, tokens, model="chat-small", kind="prompt") == prompt
    assert delta(before, after, tokens, model="chat-small", kind="completion") == completion
    assert delta(before, after, "ubc_model_billed_cu_total", model="chat-small") == (
        prompt + 2 * completion
    )
    assert delta(before, after, "ubc_model_tokens_total", model="chat-fail-500", kind="prompt") == 0
    assert delta(before, after, "ubc_ratelimit_refusals_total", model="chat-limited") == 1
    assert (
        delta(
            before, after, "ubc_upstream_errors_total", model="chat-fail-500", kind="upstream_500"
        )
        == 1
    )
    # Every call that reached the upstream was timed (the 429 did not reach it).
    seconds = "ubc_upstream_request_duration_seconds_count"
    assert delta(before, after, seconds, model="chat-small") == 1
    assert delta(before, after, seconds, model="chat-limited") == 2
    assert delta(before, after, seconds, model="chat-fail-500") == 1

    # Every metric of ubc/metrics.py is exposed (the epochs' once there is one, the
    # witnesses' once witnesses are configured: tests/test_witness_cosign.py, the read
    # replica's gauges with a replica: tests/test_replica.py).
    exposed = {name for name, _ in after}
    replica_gauges = ("ubc_replica_up", "ubc_replica_lag", "ubc_replica_replay")
    for name in _defined_names():
        if not name.startswith(("ubc_epoch", "ubc_witness", *replica_gauges)):
            assert name in exposed or f"{name}_count" in exposed, name
    # State, read at the scrape: the journal, holds, balances.
    size = int(env.operator.checkpoint().split("\n")[1])
    assert value(after, "ubc_journal_size") == size
    assert 0 <= value(after, "ubc_journal_checkpoint_age_seconds") < 60
    assert value(after, "ubc_metrics_database_up") == 1
    assert total(after, "ubc_holds_open") == 0
    assert total(after, "ubc_holds_open_amount") == 0
    assert value(after, "ubc_holds_overdue") == 0
    assets = {dict(ls)["asset"] for n, ls in after if n == "ubc_ledger_balance_sum"}
    assert "CU" in assets
    for asset in assets:
        assert value(after, "ubc_ledger_balance_sum", asset=asset) == 0
        assert value(after, "ubc_ledger_pending_balance_sum", asset=asset) == 0


def test_open_holds_and_the_balance_cache(env: Env) -> None:  # noqa: F811 - the fixture
    """A model call's hold is counted while the call runs; the balance sums are cached
    for the interval."""
    url = env.server.url
    state = env.server.app.state.metrics
    state.balance_interval = 3600
    first = scrape(url)
    assert state._balances is not None
    computed_at = state._balances.at
    _, secret = env.member("carol", 1000)
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {secret}"},
            json={
                "model": "chat-slow",  # 150 ms a token
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 40,
                "stream": True,
            },
        ) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: dropping it would close the stream
        next(lines)
        held = scrape(url)
    assert value(held, "ubc_holds_open", asset="CU") == 1
    assert value(held, "ubc_holds_open_amount", asset="CU") > 0
    assert value(held, "ubc_holds_overdue") == 0
    # The sums were computed at the first scrape and not since (the interval: an hour).
    assert state._balances.at == computed_at
    assert value(held, "ubc_ledger_balance_sum_age_seconds") >= value(
        first, "ubc_ledger_balance_sum_age_seconds"
    )
    # Computed afresh once the interval has passed: pending and posted sum to 0.
    env.settled()
    state.balance_interval = 0
    fresh = scrape(url)
    assert state._balances.at > computed_at
    assert value(fresh, "ubc_holds_open", asset="CU") == 0
    assert value(fresh, "ubc_ledger_balance_sum", asset="CU") == 0
    assert value(fresh, "ubc_ledger_pending_balance_sum", asset="CU") == 0


def test_epoch_progress(db_url: str, tmp_path: Path) -> None:
    with (
        run_server(db_url, make_data_dir(tmp_path / "data")) as server,
        served(server, {"ann": "basic", "ben": "basic", "cai": "basic"}) as http,
    ):
        http.op.submit(http.open_({"basic": 100}, None))
        info = http.wait(1, lambda i: i["status"] == "open")
        samples = scrape(server.url)
        assert value(samples, "ubc_epoch_number") == 1
        assert value(samples, "ubc_epoch_status", status="open") == 1
        assert value(samples, "ubc_epoch_status", status="opening") == 0
        assert value(samples, "ubc_epoch_members") == info["members"] == 3
        assert value(samples, "ubc_epoch_allocations_applied") == 3
        assert value(samples, "ubc_epoch_close_members_expired") == 0
        assert value(samples, "ubc_ledger_balance_sum", asset="CU") == 0


# --- access -------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["type"] == kind
    assert set(body["error"]) == {"type", "message", "detail"}


def test_access_on_loopback_is_open_by_default(db_url: str, tmp_path: Path) -> None:
    with run_server(db_url, make_data_dir(tmp_path / "data")) as server:
        assert "ubc_journal_size" in httpx.get(f"{server.url}/metrics").text


def test_access_with_a_token(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = db_url
    data = make_data_dir(tmp_path / "data")
    with run_server(db, data, metrics_access="token", metrics_token="s3cret-token") as server:
        url = f"{server.url}/metrics"
        missing = httpx.get(url)
        _error(missing, 401, "unauthenticated")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        _error(httpx.get(url, headers={"authorization": "Bearer wrong"}), 403, "forbidden")
        _error(httpx.get(url, headers={"authorization": "Basic czNjcmV0"}), 401, "unauthenticated")
        assert scrape(server.url, token="s3cret-token")[("ubc_journal_size", ())] >= 0
    # auto, served on a public address (as `ubc serve --host 0.0.0.0` tells its workers):
    # a token is required, and without one configured nobody may read.
    monkeypatch.setenv(metrics.BIND_HOST_ENV, "0.0.0.0")
    with run_server(db, data) as server:
        _error(httpx.get(f"{server.url}/metrics"), 403, "forbidden")
    with run_server(db, data, metrics_token="s3cret-token") as server:
        _error(httpx.get(f"{server.url}/metrics"), 401, "unauthenticated")
        assert ("ubc_journal_size", ()) in scrape(server.url, token="s3cret-token")
    monkeypatch.setenv(metrics.BIND_HOST_ENV, "127.0.0.1")
    with run_server(db, data, metrics_access="off") as server:
        _error(httpx.get(f"{server.url}/metrics"), 404, "not_found")


# --- ubc serve --workers 2 ----------------------------------------------------------------


@contextlib.contextmanager
def serve_workers(db_url: str, tmp_path: Path, workers: int) -> Iterator[tuple[str, Path]]:
    """``ubc serve --workers N`` in a subprocess; its temporary directory (where the
    metrics directory is made) is under ``tmp_path``."""
    data = make_data_dir(tmp_path / "data")
    temp = tmp_path / "tmp"
    temp.mkdir()
    environment = {
        **os.environ,
        "UBC_DATABASE_URL": db_url,
        "UBC_DATA_DIR": str(data),
        "UBC_ORIGIN": "test.ubc/ledger",
        "TMPDIR": str(temp),
    }
    environment.pop(metrics.MULTIPROC_ENV, None)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-c", "from ubc.cli import main; main()", "serve"]
        + ["--port", str(port), "--workers", str(workers)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError("the server did not start")
            time.sleep(0.1)
        yield url, data
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert not list(temp.glob("ubc-metrics-*")), "the metrics directory was not removed"


def _accepted_by_worker(temp: Path) -> dict[str, float]:
    """Each worker's own count of accepted envelopes, from its file in the metrics
    directory (what ``/metrics`` sums)."""
    counts: dict[str, float] = {}
    for path in temp.glob("ubc-metrics-*/counter_*.db"):
        pid = re.sub(r"\D", "", path.name)
        for key, count, *_ in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
            if json.loads(key)[1] == "ubc_envelopes_accepted_total":
                counts[pid] = counts.get(pid, 0.0) + count
    return counts


def test_workers_counters_are_summed(db_url: str, tmp_path: Path) -> None:
    with serve_workers(db_url, tmp_path, 2) as (url, _data):
        directories = list((tmp_path / "tmp").glob("ubc-metrics-*"))
        assert len(directories) == 1
        assert directories[0].stat().st_mode & 0o777 == 0o700
        before = scrape(url)
        sent = 0
        # Each registration on a new connection, until both workers have accepted some.
        while sent < 200:
            with UbcClient(url, key=generate_signing_key()) as member:
                member.register(f"member{sent}")
            sent += 1
            if sent >= 10 and len(_accepted_by_worker(tmp_path / "tmp")) >= 2:
                break
        per_worker = _accepted_by_worker(tmp_path / "tmp")
        assert len(per_worker) == 2, per_worker  # both workers accepted envelopes
        after = scrape(url)
        accepted = delta(
            before, after, "ubc_envelopes_accepted_total", type="member.register", status="201"
        )
        assert accepted == sent
        assert sum(per_worker.values()) == total(after, "ubc_envelopes_accepted_total")
        # The state metrics are there once (one collector per scrape, not per worker).
        text = httpx.get(f"{url}/metrics").text
        assert text.count("\nubc_journal_size ") == 1
        assert value(after, "ubc_journal_size") >= sent
        assert value(after, "ubc_ledger_balance_sum", asset="CU") == 0


# --- the shipped alert rules and dashboard ----------------------------------------------

_DEFINED = re.compile(r"\bubc_[a-z0-9_]+")


def _defined_names() -> set[str]:
    """Every metric name defined in ubc/metrics.py (each is a string literal there)."""
    return set(re.findall(r'"(ubc_[a-z0-9_]+)"', (ROOT / "ubc" / "metrics.py").read_text()))


def _known_names() -> set[str]:
    """Every sample name ubc exposes: the names defined, with the histogram suffixes."""
    names = _defined_names()
    for name in list(names):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_alert_rules_are_valid_and_use_known_metrics() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    known = _known_names()
    alerts = []
    for group in rules["groups"]:
        assert set(group) <= {"name", "rules", "interval"}
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert {"summary", "description"} <= set(rule["annotations"])
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            used = set(_DEFINED.findall(rule["expr"]))
            assert used, rule["alert"]
            assert used <= known, (rule["alert"], used - known)
            alerts.append(rule["alert"])
    assert "UbcLedgerBalanceSumNotZero" in alerts
    assert len(alerts) == len(set(alerts))


def test_dashboard_is_valid_and_uses_known_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ubc-dashboard.json").read_text())
    known = _known_names()
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    shown = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${" + variable["name"] + "}"
        for target in panel["targets"]:
            used = set(_DEFINED.findall(target["expr"]))
            assert used <= known, (panel["title"], used - known)
            shown |= used
    # Every metric of issue 17 has a panel.
    for name in (
        "ubc_envelopes_accepted_total",
        "ubc_envelopes_refused_total",
        "ubc_writer_batch_size_bucket",
        "ubc_writer_commit_seconds_bucket",
        "ubc_journal_size",
        "ubc_journal_checkpoint_age_seconds",
        "ubc_holds_open",
        "ubc_holds_expired_total",
        "ubc_model_calls_total",
        "ubc_model_tokens_total",
        "ubc_model_billed_cu_total",
        "ubc_upstream_request_duration_seconds_bucket",
        "ubc_upstream_errors_total",
        "ubc_ratelimit_refusals_total",
        "ubc_epoch_allocations_applied",
        "ubc_ledger_balance_sum",
    ):
        assert name in shown, name


def test_a_worker_that_exits_is_marked_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor of ``ubc serve --workers N`` tells prometheus-client of every worker
    it replaced or removed, which drops that worker's live gauges."""
    from ubc.serving import _Supervisor

    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    for pid in (101, 102):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")

    class Worker:
        def __init__(self, pid: int) -> None:
            self.pid = pid

    supervisor = _Supervisor.__new__(_Supervisor)
    supervisor.processes = [Worker(101), Worker(102)]  # type: ignore[list-item]

    def replace_first() -> None:
        supervisor.processes[0] = Worker(103)  # type: ignore[call-overload]

    supervisor._replaced(replace_first)
    assert not (tmp_path / "gauge_livesum_101.db").exists()
    assert (tmp_path / "gauge_livesum_102.db").exists()
    # Counters of an exited worker stay: they are part of the totals.
    assert (tmp_path / "counter_101.db").exists()
