"""The utilization report and the epoch commands, end to end against a real server.

Members in two tiers (and one in a tier without allocation) get an epoch opened with the
CLI, send to each other, spend on models, and the epoch is closed with the CLI. Every
number of the report is then recomputed here from each member's own history.

There is no model endpoint yet, so model usage is written the way it will be: a hold on
the member's account for ``system:consumption`` through the ledger core, then posted for
the actual cost (or voided, or left pending, neither of which is usage).
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner, Result

from tests.conftest import LiveServer
from ubc.cli import app as cli
from ubc.cli import epoch as cli_epoch
from ubc.client import UbcApiError, UbcClient
from ubc.db import make_engine, make_session_factory, unit_of_work
from ubc.epochs import report
from ubc.epochs import service as epochs_service
from ubc.ledger import service as ledger
from ubc.ledger.service import LedgerRequest, Leg, Post, Void
from ubc.signing import generate_signing_key

runner = CliRunner()
FLOWS = ("allocated", "used", "sent", "received", "donated", "sold", "bought", "expired")
KINDS = {
    ("allocation", +1): "allocated",
    ("usage", -1): "used",
    ("transfer", -1): "sent",
    ("transfer", +1): "received",
    ("donation", -1): "donated",
    ("trade", -1): "sold",
    ("trade", +1): "bought",
    ("expiry", -1): "expired",
}


class Operator:
    """The operator at the server's machine: the key and token in ``$UBC_DATA_DIR``."""

    def __init__(self, server: LiveServer, config_dir: Path) -> None:
        self.server = server
        self.env: dict[str, str | None] = {
            "UBC_CONFIG_DIR": str(config_dir),
            "UBC_SERVER": server.url,
            "UBC_TOKEN": None,
            "UBC_DATA_DIR": str(server.data_dir),
            "COLUMNS": "200",
        }

    def run(self, *args: str, **env: str) -> Result:
        result = runner.invoke(cli, list(args), env={**self.env, **env})
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output
        return result

    def ok(self, *args: str, **env: str) -> str:
        result = self.run(*args, **env)
        assert result.exit_code == 0, result.output
        return result.stdout

    def fails(self, *args: str, **env: str) -> str:
        result = self.run(*args, **env)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: ")
        return " ".join(result.stderr.split())


@pytest.fixture
def book(live_server: LiveServer) -> Iterator[sessionmaker[Session]]:
    """Sessions on the served database, for writing what the model endpoint will write."""
    engine = make_engine(live_server.db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def connect(live_server: LiveServer) -> Iterator[Callable[..., UbcClient]]:
    """``UbcClient(live_server.url, ...)``, closed at the end of the test."""
    made: list[UbcClient] = []

    def make(**options: Any) -> UbcClient:
        client = UbcClient(live_server.url, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def use_models(book: sessionmaker[Session], handle: str, hold: int, cost: int | None) -> None:
    """A model call: hold ``hold``, then post ``cost`` (None: void; 0: leave it pending)."""
    request = uuid.uuid4().hex
    leg = Leg(
        f"member:{handle}", "system:consumption", "CU", hold, "usage", timeout=timedelta(hours=1)
    )
    with unit_of_work(book) as s:
        ledger.apply(s, LedgerRequest(request, (leg,)))
    if cost == 0:
        return
    settle = Void(f"{request}:0") if cost is None else Post(f"{request}:0", cost)
    with unit_of_work(book) as s:
        ledger.apply(s, LedgerRequest(uuid.uuid4().hex, (settle,)))


def expected_from_history(
    op: UbcClient, address: str, start: datetime, end: datetime
) -> dict[str, int] | None:
    """The report's flows of ``address`` recomputed from its history (None: no postings)."""
    flows = dict.fromkeys(FLOWS, 0)
    seen = False
    for item in op.iter_history(address, asset="CU"):
        if not start <= datetime.fromisoformat(item["created_at"]) <= end:
            continue
        seen = True
        if item["amount"]:
            sign = 1 if item["amount"] > 0 else -1
            flows[KINDS[(item["kind"], sign)]] += abs(item["amount"])
    return flows if seen else None


def percent(used: int, allocated: int) -> str | None:
    if not allocated:
        return None
    exact = Decimal(used * 100) / Decimal(allocated)
    return str(exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def test_report_matches_every_members_history(
    live_server: LiveServer,
    book: sessionmaker[Session],
    connect: Callable[..., UbcClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A tiny batch size: the epoch is applied in the background and the CLI polls it.
    monkeypatch.setattr(epochs_service, "CHUNK", 1)
    op = connect(key=live_server.operator_key, token=live_server.operator_token)
    members = {}
    tiers = {"alice": "basic", "bob": "basic", "carol": "pro", "dave": "pro", "erin": "guest"}
    for handle in [*tiers, "frank"]:
        client = connect(key=generate_signing_key(), handle=handle)
        client.register()
        members[handle] = client
    for handle, tier in tiers.items():
        op.admit(handle, tier)
    op.admit("frank", "basic")
    op.update_member("frank", status="suspended", reason="away")
    # Before the epoch: not in its window.
    op.deposit("alice", 50, external_ref="wire-1")
    members["alice"].send("bob", 10)

    cli_op = Operator(live_server, tmp_path / "op")
    assert "TIER=AMOUNT" in cli_op.fails("epoch", "open", "--epoch", "1", "--allocation", "x")
    out = cli_op.ok(
        "epoch",
        "open",
        "--epoch",
        "1",
        "--allocation",
        "basic=100",
        "--allocation",
        "pro=300",
        "--carryover-cap",
        "40",
    )
    assert "Opened epoch 1 (journal entry " in out
    lines = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    assert "basic 100 2 200" in lines
    assert "pro 300 2 600" in lines
    assert "total 4 800 CU" in lines
    info = op._get("/api/epochs/1")
    assert (info["status"], info["members"], info["applied"], info["issued"]) == (
        "open",
        4,
        4,
        800,
    )
    assert "already opened" in cli_op.fails(
        "epoch", "open", "--epoch", "1", "--allocation", "basic=100"
    )

    # The epoch's activity.
    members["alice"].send("bob", 30)
    members["bob"].send("carol", 45)
    members["carol"].send("erin", 7)
    members["dave"].send("alice", 100)
    members["erin"].send("alice", 3)
    use_models(book, "alice", 80, 60)
    use_models(book, "carol", 200, 200)
    use_models(book, "dave", 50, None)  # voided: not usage
    use_models(book, "bob", 20, 0)  # still held at close: not usage, not expired
    use_models(book, "erin", 2, 2)

    # While the epoch is open, the window ends now.
    running = op._get("/api/reports/utilization", params={"epoch": 1})
    assert running["status"] == "open"
    assert running["totals"]["expired"] == 0

    out = cli_op.ok("epoch", "close", "1")
    assert "Closed epoch 1 (journal entry " in out
    # alice 153 - 40, bob 75 available - 40, carol 138 - 40, dave 200 - 40; erin has 2.
    assert "Members expired: 4" in out
    assert "Total expired: 406 CU" in out
    members["alice"].send("bob", 1)  # after the close: not in the window

    # The report, and every number recomputed from each member's history.
    got = op._get("/api/reports/utilization", params={"epoch": 1, "below": "50"})
    epoch = op._get("/api/epochs/1")
    start = datetime.fromisoformat(epoch["opened_at"])
    end = datetime.fromisoformat(epoch["closed_at"])
    assert (got["epoch"], got["asset"], got["status"]) == (1, "CU", "closed")
    assert (got["from"], got["to"]) == (epoch["opened_at"], epoch["closed_at"])
    assert got["cu_price_usd"] == "0.001"
    price = Decimal(got["cu_price_usd"])
    expected = []
    for handle in sorted(members):
        flows = expected_from_history(op, f"member:{handle}", start, end)
        if flows is None:
            continue
        expected.append(
            {
                "address": f"member:{handle}",
                **flows,
                "utilization": percent(flows["used"], flows["allocated"]),
                "allocated_usd": str(price * flows["allocated"]),
                "used_usd": str(price * flows["used"]),
            }
        )
    assert got["members"] == expected
    # frank (suspended, idle) is absent; erin (no allocation, active) is there.
    assert [m["address"] for m in got["members"]] == [
        "member:alice",
        "member:bob",
        "member:carol",
        "member:dave",
        "member:erin",
    ]
    by_address = {m["address"]: m for m in got["members"]}
    # The window: bob received 30 in the epoch, not the 10 before nor the 1 after it.
    assert by_address["member:bob"]["received"] == 30
    assert by_address["member:alice"]["sent"] == 30
    assert by_address["member:alice"]["used"] == 60
    assert by_address["member:alice"]["used_usd"] == "0.060"
    assert by_address["member:carol"]["utilization"] == "66.67"
    assert by_address["member:erin"]["allocated"] == 0
    assert by_address["member:erin"]["utilization"] is None
    totals = got["totals"]
    for flow in FLOWS:
        assert totals[flow] == sum(m[flow] for m in got["members"]), flow
    assert totals["allocated"] == 800
    assert totals["expired"] == 406
    assert totals["used"] == 262
    assert totals["utilization"] == percent(262, 800) == "32.75"
    assert totals["allocated_usd"] == "0.800"
    assert totals["used_usd"] == "0.262"

    # Below 50%: allocated members whose exact utilization is under it.
    assert got["below"] == "50"
    assert got["below_members"] == ["member:bob", "member:dave"]
    # The exact ratio counts: carol's 66.666...% is under 66.67 though shown as 66.67.
    near = op._get("/api/reports/utilization", params={"epoch": 1, "below": "66.67"})
    assert near["below_members"] == ["member:alice", "member:bob", "member:carol", "member:dave"]
    near = op._get("/api/reports/utilization", params={"epoch": 1, "below": "66.666"})
    assert near["below_members"] == ["member:alice", "member:bob", "member:dave"]
    assert op._get("/api/reports/utilization", params={"epoch": 1})["below_members"] == []

    # The CLI: table, totals, members under the threshold, and the same rows as CSV.
    csv_path = tmp_path / "epoch-1.csv"
    out = cli_op.ok(
        "report", "utilization", "--epoch", "1", "--below", "50", "--output", str(csv_path)
    )
    rows = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    assert "member:carol 300 200 7 45 0 0 0 98 66.67% 0.300 0.200" in rows
    assert "member:erin 0 2 3 7 0 0 0 0 - 0.000 0.002" in rows
    assert "total 800 262 185 185 0 0 0 406 32.75% 0.800 0.262" in rows
    assert "2 member(s) under 50%:" in out
    assert "member:bob 0.00%" in rows
    assert "member:dave 0.00%" in rows
    assert f"Wrote 5 rows to {csv_path}." in " ".join(out.split())
    with csv_path.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [list(r) for r in table[:1]] == [list(report.COLUMNS)]
    assert table == [{k: "" if v is None else str(v) for k, v in m.items()} for m in got["members"]]
    assert "No member under 0%." in cli_op.ok(
        "report", "utilization", "--epoch", "1", "--below", "0"
    )
    out = cli_op.ok("report", "utilization", "--epoch", "1", "--below", "66.67%")
    assert "4 member(s) under 66.67%:" in out
    assert "not a percent" in cli_op.fails("report", "utilization", "--epoch", "1", "--below", "x")
    assert "no epoch 9" in cli_op.fails("report", "utilization", "--epoch", "9")

    # epoch list / show.
    out = cli_op.ok("epoch", "list")
    [row] = [" ".join(r.replace("│", " ").split()) for r in out.splitlines() if "closed" in r]
    assert row.startswith("1 CU closed ")
    assert row.endswith(" 4 800 406")
    out = cli_op.ok("epoch", "show", "1")
    shown = [" ".join(r.replace("│", " ").split()) for r in out.splitlines()]
    for line in (
        "status closed",
        "carryover cap 40 CU",
        "allocation basic 100 CU",
        "allocation pro 300 CU",
        "members 4",
        "issued 800 CU",
        "members expired 4",
        "expired 406 CU",
    ):
        assert line in shown, line
    assert "no epoch 2" in cli_op.fails("epoch", "show", "2")
    assert "already closed" in cli_op.fails("epoch", "close", "1")


def test_report_is_for_the_operator_and_auditors_only(
    live_server: LiveServer, connect: Callable[..., UbcClient]
) -> None:
    url = live_server.url
    op = connect(key=live_server.operator_key, token=live_server.operator_token)
    alice = connect(key=generate_signing_key(), handle="alice")
    alice.register()
    op.admit("alice", "basic")
    secret, _ = alice.grant_api_key("read", scopes=["read"])
    alice.token = secret
    op.submit(
        op.envelope(
            "epoch.open",
            epoch=1,
            asset="CU",
            allocations={"basic": 10},
            starts_at="2026-01-01T00:00:00Z",
            ends_at="2026-02-01T00:00:00Z",
        )
    )
    path = "/api/reports/utilization"
    with pytest.raises(UbcApiError) as refused:
        alice._get(path, params={"epoch": 1})
    assert refused.value.status == 403
    with pytest.raises(UbcApiError) as unknown:
        op._get(path, params={"epoch": 2})
    assert unknown.value.status == 404
    with pytest.raises(UbcApiError) as anonymous:
        connect()._get(path, params={"epoch": 1})
    assert anonymous.value.status == 401
    for epoch in (0, 2**53, 10**20):  # numbers of epochs are 1 to 2**53 - 1
        with pytest.raises(UbcApiError) as invalid:
            op._get(path, params={"epoch": epoch})
        assert invalid.value.status == 422, epoch
    for bad in ("-1", "1e-999999999", "1e3", "NaN", "12.1234567", "12345678"):
        with pytest.raises(UbcApiError) as invalid:
            op._get(path, params={"epoch": 1, "below": bad})
        assert invalid.value.status == 422, bad
    auditor = connect(token=live_server.auditor_token)
    body: dict[str, Any] = auditor._get(path, params={"epoch": 1})
    assert [(m["address"], m["allocated"], m["utilization"]) for m in body["members"]] == [
        ("member:alice", 10, "0.00")
    ]
    # The member's own key is refused by the CLI too, in red.
    result = runner.invoke(
        cli,
        ["report", "utilization", "--epoch", "1", "--server", url],
        env={"UBC_TOKEN": secret, "UBC_CONFIG_DIR": "/nonexistent", "UBC_DATA_DIR": "/nowhere"},
    )
    assert result.exit_code == 1
    assert "only the operator and auditors" in result.stderr


def test_percent_and_usd_are_exact() -> None:
    assert report.percent(0, 100) == "0.00"
    assert report.percent(2, 3) == "66.67"
    assert report.percent(1, 3) == "33.33"
    assert report.percent(1, 8) == "12.50"
    assert report.percent(1, 20_000) == "0.01"  # 0.005 exactly: half up
    assert report.percent(1, 20_001) == "0.00"
    assert report.percent(250, 100) == "250.00"
    assert report.percent(5, 0) is None
    big = 2**63 - 1
    assert report.percent(big - 1, big) == "100.00"
    assert report.usd(Decimal("0.001"), 3) == "0.003"
    assert report.usd(Decimal("0.001"), 0) == "0.000"
    price = Decimal("999999999999.999999999999")
    assert report.usd(price, big) == "9223372036854775806999990776627.963145224193"
    out = io.StringIO()
    row = report.MemberUsage("member:a", 1, 0, 0, 0, 0, 0, 0, 0, None, "0.001", "0")
    assert report.write_csv([row.to_json()], out) == 1
    assert out.getvalue().splitlines() == [
        ",".join(report.COLUMNS),
        "member:a,1,0,0,0,0,0,0,0,,0.001,0",
    ]


def report_as_before(
    book: sessionmaker[Session], epoch: int, price: Decimal
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, tuple[int, int]]]:
    """The report as the server built it before it paged: one GROUP BY of every member in
    memory, the returns from escrow taken off, sorted in Python (code point order). Its
    rows, totals, and the returns from escrow per seller."""
    with book() as s:
        info = epochs_service.get_epoch(s, epoch)
        upper = "" if info.last_posting is None else "AND p.id <= :last "
        window = {"first": info.first_posting, "last": info.last_posting, "asset": info.asset}
        sums = ", ".join(
            f"sum(CASE WHEN t.kind = '{kind}' AND p.side = '{side}' THEN p.posted ELSE 0 END)"
            for kind, side in report.FLOWS.values()
        )
        grouped = s.execute(
            text(
                f"SELECT a.address, {sums} FROM postings p "
                "JOIN transfers t ON t.id = p.transfer_id JOIN accounts a ON a.id = p.account_id "
                "WHERE a.asset = :asset AND a.address LIKE 'member:%' "
                f"AND p.id > :first {upper}GROUP BY a.address"
            ),
            window,
        ).all()
        returned = {
            str(seller): (int(back), int(same))
            for seller, back, same in s.execute(
                text(
                    "SELECT o.seller, sum(p.posted), "
                    "sum(CASE WHEN c.id > :first THEN p.posted ELSE 0 END) FROM offers o "
                    "JOIN transfers t ON t.id = o.closed_by || :leg0 "
                    "JOIN postings p ON p.transfer_id = t.id AND p.side = 'C' "
                    "JOIN accounts a ON a.id = p.account_id "
                    "LEFT JOIN postings c ON c.transfer_id = o.id || :leg0 AND c.side = 'D' "
                    "WHERE o.status IN ('cancelled', 'expired') AND t.kind = 'trade' "
                    "AND o.sell_asset = :asset AND a.address = o.seller AND a.asset = :asset "
                    f"AND p.id > :first {upper}GROUP BY o.seller"
                ),
                {**window, "leg0": ":0"},
            )
        }
    rows = []
    for address, *values in sorted(grouped, key=lambda r: str(r[0])):
        flows = dict(zip(FLOWS, (int(v) for v in values), strict=True))
        back, same = returned.get(str(address), (0, 0))
        flows["bought"] -= back
        flows["sold"] -= same
        rows.append(as_row(str(address), flows, price))
    totals = as_row("total", {f: sum(r[f] for r in rows) for f in FLOWS}, price)
    return rows, totals, returned


def as_row(address: str, flows: dict[str, int], price: Decimal) -> dict[str, Any]:
    return {
        "address": address,
        **flows,
        "utilization": percent(flows["used"], flows["allocated"]),
        "allocated_usd": report.usd(price, flows["allocated"]),
        "used_usd": report.usd(price, flows["used"]),
    }


def as_csv(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]


def test_report_pages_and_streams_every_member_once_in_code_point_order(
    live_server: LiveServer,
    book: sessionmaker[Session],
    connect: Callable[..., UbcClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op = connect(key=live_server.operator_key, token=live_server.operator_token)
    # Handles whose code point order ('-' < '0' < '_' < 'a') is not a locale's order.
    handles = ["b_2", "a0b", "aab", "a_b", "a-b", "b-1", "b12", "seller", "buyer", "idle"]
    members = {}
    for handle in handles:
        client = connect(key=generate_signing_key(), handle=handle)
        client.register()
        op.admit(handle, "basic")
        members[handle] = client
    op.update_member("idle", status="suspended", reason="away")  # no posting: no row
    op.deposit("seller", 100, external_ref="cu-1")
    op.deposit("buyer", 5000, "USD", external_ref="usd-1")
    # An offer of an earlier epoch (none): its return counts neither as sold nor bought.
    earlier = members["seller"].sell(40, 100)["id"]

    cli_op = Operator(live_server, tmp_path / "op")
    cli_op.ok("epoch", "open", "--epoch", "1", "--allocation", "basic=100")
    members["a-b"].send("a_b", 5)
    members["b12"].send("a-b", 7)
    use_models(book, "a0b", 30, 25)
    use_models(book, "b-1", 90, 90)
    members["buyer"].buy(earlier, 15)
    members["seller"].cancel_offer(earlier)  # 25 back
    offered = members["a0b"].sell(30, 60)["id"]
    members["buyer"].buy(offered, 10)
    members["a0b"].cancel_offer(offered)  # 20 back, taken off this epoch's sale
    cli_op.ok("epoch", "close", "1")

    path = "/api/reports/utilization"
    price = Decimal(op.ledger_info()["cu_price_usd"])
    before, totals, returned = report_as_before(book, 1, price)
    assert returned["member:seller"] == (25, 0)
    assert returned["member:a0b"] == (20, 20)
    addresses = [r["address"] for r in before]
    assert addresses == sorted(f"member:{h}" for h in handles if h != "idle")
    assert addresses[:4] == ["member:a-b", "member:a0b", "member:a_b", "member:aab"]
    for flow in FLOWS:
        assert totals[flow] == sum(r[flow] for r in before)

    # One page by default: every member, the totals, no next page.
    whole = op.utilization(1, below="50")
    assert whole["members"] == before
    assert whole["totals"] == totals
    assert whole["next_cursor"] is None
    under = [r["address"] for r in before if r["allocated"] and r["used"] * 2 < r["allocated"]]
    assert whole["below_members"] == under
    assert "member:b-1" not in under  # used 90 of 100

    # Small pages: each member once, in order; totals on the first page only.
    for limit in (1, 2, 3, 9, 10):
        pages = [op.utilization(1, below="50", limit=limit)]
        while pages[-1]["next_cursor"] is not None:
            assert pages[-1]["next_cursor"] == pages[-1]["members"][-1]["address"]
            pages.append(
                op.utilization(1, below="50", limit=limit, cursor=pages[-1]["next_cursor"])
            )
        assert len(pages) == -(-len(before) // limit), limit
        assert all(len(p["members"]) <= limit for p in pages)
        assert [m for p in pages for m in p["members"]] == before, limit
        assert [a for p in pages for a in p["below_members"]] == under, limit
        assert pages[0]["totals"] == totals
        assert all(p["totals"] is None for p in pages[1:])
    # A cursor past the last member: an empty last page.
    assert op.utilization(1, cursor="member:zzz") == {
        **whole,
        "members": [],
        "totals": None,
        "below": None,
        "below_members": [],
        "next_cursor": None,
    }

    # The CSV: the same rows, streamed (here a row at a time), and a total row.
    monkeypatch.setattr(report, "CSV_CHUNK", 1)
    pieces = list(op.iter_utilization_csv(1))
    streamed = "".join(pieces)
    table = list(csv.DictReader(io.StringIO(streamed)))
    assert streamed.splitlines()[0] == ",".join(report.COLUMNS)
    assert table == as_csv([*before, totals])
    with httpx.Client(base_url=live_server.url) as http:
        auth = {"Authorization": f"Bearer {live_server.operator_token}"}
        answer = http.get(path, params={"epoch": 1}, headers={**auth, "Accept": "text/csv"})
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/csv")
        assert "utilization-epoch-1.csv" in answer.headers["content-disposition"]
        assert answer.text == streamed
        # JSON unless CSV comes first; errors stay JSON.
        assert http.get(path, params={"epoch": 1}, headers=auth).json() == whole | {
            "below": None,
            "below_members": [],
        }
        prefers_json = {**auth, "Accept": "application/json, text/csv"}
        assert http.get(path, params={"epoch": 1}, headers=prefers_json).json()["members"] == before
        missing = http.get(path, params={"epoch": 2}, headers={**auth, "Accept": "text/csv"})
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found"

        # A bad cursor: 400 with the error body, for JSON and CSV, and nothing changes.
        size = op.checkpoint().splitlines()[1]
        for bad in (
            "x",
            "17",
            "member:",
            "member:A",
            "member:a b",
            "member:%",
            "cause:x",
            "member:" + "a" * 65,
        ):
            for accept in ("application/json", "text/csv"):
                refused = http.get(
                    path, params={"epoch": 1, "cursor": bad}, headers={**auth, "Accept": accept}
                )
                assert refused.status_code == 400, (bad, accept)
                assert refused.json()["error"]["type"] == "bad_request"
                assert refused.json()["error"]["detail"] == {"cursor": bad}
        for limit in (0, report.MAX_LIMIT + 1):
            assert (
                http.get(path, params={"epoch": 1, "limit": limit}, headers=auth).status_code == 422
            )
        # A stream the client leaves after its first piece: the server's session is
        # closed all the same, as after every stream above (no connection left out).
        with http.stream(
            "GET", path, params={"epoch": 1}, headers={**auth, "Accept": "text/csv"}
        ) as left:
            assert next(left.iter_bytes()).startswith(b"address,")
    pool = live_server.app.state.read_sessions.kw["bind"].pool
    deadline = time.monotonic() + 10
    while pool.checkedout() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.checkedout() == 0
    assert op.checkpoint().splitlines()[1] == size
    assert op.utilization(1, below="50") == whole

    # The CLI follows the pages: the same table and JSON whatever the page size; its CSV
    # (streamed) has the members' rows, as before, without the total row.
    table_out = cli_op.ok("report", "utilization", "--epoch", "1", "--below", "50")
    json_out = cli_op.ok("report", "utilization", "--epoch", "1", "--json")
    assert json.loads(json_out) == {k: v for k, v in whole.items() if k != "next_cursor"} | {
        "below": None,
        "below_members": [],
    }
    monkeypatch.setattr(cli_epoch, "REPORT_PAGE", 2)
    assert cli_op.ok("report", "utilization", "--epoch", "1", "--below", "50") == table_out
    assert cli_op.ok("report", "utilization", "--epoch", "1", "--json") == json_out
    assert "member:b12 100 0 7 0 0 0 0 0 0.00% 0.100 0.000" in [
        " ".join(line.replace("│", " ").split()) for line in table_out.splitlines()
    ]
    printed = cli_op.ok("report", "utilization", "--epoch", "1", "--csv")
    assert list(csv.DictReader(io.StringIO(printed))) == as_csv(before)
    written = tmp_path / "epoch-1.csv"
    out = cli_op.ok("report", "utilization", "--epoch", "1", "--output", str(written))
    assert f"Wrote {len(before)} rows to {written}." in " ".join(out.split())
    assert written.read_text() == printed
