"""The ledger asks its witnesses to cosign and serves the cosigned checkpoint (issue 18, item 1).

A real ledger (served on loopback, SQLite and PostgreSQL, on a :class:`ManualClock`) is
configured with real witnesses (``ubc witness serve``'s app, served on loopback over
HTTP, each with a SQLite store of its own). Rounds are run by the server's background
task and, to know when one has run, by the test itself through the same object
(``app.state.witness_rounds``): the interval is on the ledger's clock, which the tests
move instead of sleeping.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from tests.conftest import LiveServer, _free_port, make_data_dir, run_server, serve_asgi
from tests.test_witness import ORIGIN, Ledger, body_of, size_of
from ubc.cli import app as cli_app
from ubc.clock import ManualClock
from ubc.config import get_settings
from ubc.db import make_engine, make_session_factory
from ubc.journal.checkpoint import format_checkpoint, parse_tlog_proof
from ubc.signing import NoteSigner, NoteVerifier, generate_signing_key
from ubc.signing.keys import load_signing_key
from ubc.witness.app import create_witness_app
from ubc.witness.cosignature import Cosigner
from ubc.witness.cosigning import (
    WitnessRounds,
    parse_witnesses,
    witnessing_of,
)
from ubc.witness.protocol import Witness, format_add_checkpoint
from ubc.witness.quorum import WitnessPolicy
from ubc.witness.store import WitnessStore

INTERVAL = 60.0


# --- helpers -------------------------------------------------------------------------------


def ledger_vkey(data_dir: Path) -> str:
    return NoteSigner(ORIGIN, load_signing_key(data_dir / "ledger.key")).vkey


@dataclass
class RunningWitness:
    url: str
    cosigner: Cosigner
    store: WitnessStore

    @property
    def vkey(self) -> str:
        return self.cosigner.vkey

    @property
    def name(self) -> str:
        return self.cosigner.name


@contextlib.contextmanager
def run_witness(
    path: Path, cosigner: Cosigner, ledger: str, port: int | None = None
) -> Iterator[RunningWitness]:
    """``ubc witness serve``'s app for the ledger of vkey ``ledger``, its store in ``path``."""
    engine = make_engine(f"sqlite:///{path}")
    store = WitnessStore(engine)
    store.create()
    witness = Witness(cosigner, {ORIGIN: [NoteVerifier.from_vkey(ledger)]}, store)
    try:
        with serve_asgi(create_witness_app(witness), port or _free_port()) as url:
            yield RunningWitness(url, cosigner, store)
    finally:
        engine.dispose()


def new_cosigner(name: str) -> Cosigner:
    """A witness key under ``name`` made unique (the request counters are per process)."""
    return Cosigner(f"{name}-{uuid.uuid4().hex[:8]}", generate_signing_key())


def setting(*pairs: tuple[Cosigner, str]) -> str:
    return ",".join(f"{c.vkey}@{url}" for c, url in pairs)


@contextlib.contextmanager
def ledger_with(
    db_url: str, data_dir: Path, witnesses: str, **overrides: object
) -> Iterator[Ledger]:
    clock = ManualClock()
    with (
        run_server(
            db_url,
            data_dir,
            clock=clock,
            witnesses=witnesses,
            **{"witness_interval_seconds": INTERVAL, "witness_timeout_seconds": 2.0, **overrides},
        ) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield Ledger(server, client)


def rounds(server: LiveServer) -> WitnessRounds:
    value = server.app.state.witness_rounds
    assert isinstance(value, WitnessRounds)
    return value


def run_round(server: LiveServer) -> str:
    """A round now if one is due (the background task may be running one: wait it out)."""
    return settle(rounds(server))


def settle(witness_rounds: WitnessRounds) -> str:
    """:meth:`WitnessRounds.tick`, again while another round holds the locks."""
    deadline = time.monotonic() + 30
    while True:
        result = witness_rounds.tick_blocking()
        if result != "busy":
            return result
        assert time.monotonic() < deadline, "a witness round never finished"
        time.sleep(0.05)


def next_round(ledger: Ledger) -> str:
    """Move the ledger's clock past the interval and make sure a round ran since."""
    ledger.server.clock.advance(INTERVAL)
    return run_round(ledger.server)


def cosignature_lines(note: str) -> list[str]:
    return [line for line in note.split("\n\n", 1)[1].splitlines() if line][1:]


def status(ledger: Ledger) -> dict[str, object]:
    answer = ledger.client.get("/journal/witnesses")
    assert answer.status_code == 200, answer.text
    body: dict[str, object] = answer.json()
    return body


def witness_status(ledger: Ledger, name: str) -> dict[str, object]:
    items = status(ledger)["witnesses"]
    assert isinstance(items, list)
    [found] = [w for w in items if w["name"] == name]
    return dict(found)


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args), env={"UBC_TOKEN": None})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.replace("\u2502", " ").split())


def metric(ledger: Ledger, pattern: str) -> float | None:
    text = ledger.client.get("/metrics").text
    match = re.search(pattern + r" ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


# --- a ledger and one witness ------------------------------------------------------------


def test_the_ledger_serves_its_checkpoint_cosigned(db_url: str, tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "data")
    vkey = ledger_vkey(data_dir)
    cosigner = new_cosigner("witness.test/w1")
    with run_witness(tmp_path / "w1.db", cosigner, vkey) as witness:
        with ledger_with(db_url, data_dir, setting((cosigner, witness.url))) as ledger:
            ledger.grow(2)
            assert next_round(ledger) in ("done", "idle", "not_due")
            note = ledger.checkpoint()
            size = size_of(note)
            # The ledger's line first, then the witness's; both verify.
            lines = note.split("\n\n", 1)[1].splitlines()
            assert lines[0].startswith(f"\u2014 {ORIGIN} ")
            assert cosignature_lines(note)
            assert cosignature_lines(note)[0].startswith(f"\u2014 {cosigner.name} ")
            assert NoteVerifier.from_vkey(vkey).verify(note) == body_of(note)
            verdict = WitnessPolicy.from_vkeys([cosigner.vkey], 1).check(note)
            assert verdict.ok
            assert not verdict.invalid
            # The witness stored that very checkpoint.
            stored = witness.store.get(ORIGIN)
            assert stored is not None
            assert stored.size == size

            # A reader that requires the witness: the auditor and a member's receipt.
            token = ledger.server.auditor_token
            code, output = cli(
                "audit", "verify", ledger.server.url, "--vkey", vkey, "--token", token,
                "--witness", cosigner.vkey, "--quorum", "1",
            )  # fmt: skip
            assert code == 0, output
            assert "1 of 1 witnesses cosigned" in output
            receipt = tmp_path / "proof.tlog-proof"
            code, output = cli(
                "proof", "get", "3", "--server", ledger.server.url, "--token", token,
                "--witness", cosigner.vkey, "-o", str(receipt),
            )  # fmt: skip
            assert code == 0, output
            assert cosigner.name in parse_tlog_proof(receipt.read_text()).checkpoint
            code, output = cli(
                "proof", "check", str(receipt), "--vkey", vkey,
                "--witness", cosigner.vkey, "--quorum", "1",
            )  # fmt: skip
            assert code == 0, output
            assert f"cosigned by {cosigner.name}" in output

            # What the operator sees: the status, the witnessed checkpoint, the metrics.
            assert ledger.client.get("/journal/checkpoint/cosigned").text == note
            body = status(ledger)
            assert body["size"] == size
            assert body["witnessed_size"] == size
            assert body["quorum"] == 1
            mine = witness_status(ledger, cosigner.name)
            assert mine["status"] == "cosigned"
            assert mine["cosigned_size"] == size
            assert mine["size"] == size
            assert mine["url"] == witness.url
            assert mine["vkey"] == cosigner.vkey
            requests = metric(
                ledger,
                rf'ubc_witness_requests_total\{{status="200",witness="{cosigner.name}"\}}',
            )
            assert requests is not None
            assert requests >= 1
            gauge = metric(ledger, rf'ubc_witness_cosigned_size\{{witness="{cosigner.name}"\}}')
            assert gauge == size

            # Batching: new entries wait for the interval (the ledger's clock).
            ledger.grow(1)
            assert run_round(ledger.server) == "not_due"
            assert cosignature_lines(ledger.checkpoint()) == []
            # The latest checkpoint is not cosigned: an auditor that requires the witness
            # verifies the journal under the largest cosigned one (the entries it covers).
            code, output = cli(
                "audit", "verify", ledger.server.url, "--vkey", vkey, "--token", token,
                "--witness", cosigner.vkey, "--quorum", "1", "--json",
            )  # fmt: skip
            assert code == 0, output
            assert json.loads(output)["entries"] == size
            ledger.server.clock.advance(INTERVAL - 1)
            assert run_round(ledger.server) == "not_due"
            ledger.server.clock.advance(1)
            run_round(ledger.server)
            later = ledger.checkpoint()
            assert size_of(later) == size + 2
            assert WitnessPolicy.from_vkeys([cosigner.vkey]).check(later).ok
            # Nothing new: no round, whatever the time.
            ledger.server.clock.advance(INTERVAL)
            assert run_round(ledger.server) == "idle"


def test_a_witness_at_another_size_is_asked_again_from_its_size(
    db_url: str, tmp_path: Path
) -> None:
    """409 text/x.tlog.size: the ledger retries with the proof from the witness's size."""
    data_dir = make_data_dir(tmp_path / "data")
    vkey = ledger_vkey(data_dir)
    cosigner = new_cosigner("witness.test/w1")
    port = _free_port()
    with run_witness(tmp_path / "w1.db", cosigner, vkey, port) as witness:
        # The witness learned a checkpoint of the ledger before the ledger knew of it.
        with run_server(db_url, data_dir) as plain:
            with httpx.Client(base_url=plain.url, timeout=30) as client:
                early = Ledger(plain, client)
                early.grow(1)
                seeded = early.checkpoint()
                answer = httpx.post(
                    f"{witness.url}/add-checkpoint",
                    content=format_add_checkpoint(0, [], seeded).encode(),
                )
                assert answer.status_code == 200, answer.text
                early.grow(2)
        with ledger_with(db_url, data_dir, setting((cosigner, witness.url))) as ledger:
            run_round(ledger.server)
            note = ledger.checkpoint()
            assert size_of(note) == size_of(seeded) + 4
            assert WitnessPolicy.from_vkeys([cosigner.vkey]).check(note).ok
            mine = witness_status(ledger, cosigner.name)
            assert mine["status"] == "cosigned"
            assert mine["size"] == size_of(note)
            conflicts = metric(
                ledger,
                rf'ubc_witness_requests_total\{{status="409",witness="{cosigner.name}"\}}',
            )
            assert conflicts == 1
            stored = witness.store.get(ORIGIN)
            assert stored is not None
            assert stored.size == size_of(note)


def test_a_witness_beyond_the_ledger_is_reported(db_url: str, tmp_path: Path) -> None:
    """A witness that cosigned a larger tree of this origin (a fork signed with the
    ledger's key): the ledger stores nothing and says so."""
    data_dir = make_data_dir(tmp_path / "data")
    vkey = ledger_vkey(data_dir)
    cosigner = new_cosigner("witness.test/w1")
    with run_witness(tmp_path / "w1.db", cosigner, vkey) as witness:
        forged = NoteSigner(ORIGIN, load_signing_key(data_dir / "ledger.key")).sign(
            format_checkpoint(ORIGIN, 1000, b"\x07" * 32)
        )
        answer = httpx.post(
            f"{witness.url}/add-checkpoint", content=format_add_checkpoint(0, [], forged).encode()
        )
        assert answer.status_code == 200
        with ledger_with(db_url, data_dir, setting((cosigner, witness.url))) as ledger:
            ledger.grow(1)
            next_round(ledger)
            assert cosignature_lines(ledger.checkpoint()) == []
            mine = witness_status(ledger, cosigner.name)
            assert mine["status"] == "ahead"
            assert mine["size"] == 1000
            assert "beyond" in str(mine["error"])
            assert ledger.client.get("/journal/checkpoint/cosigned").status_code == 404
            # It is asked again at the next round (it may have been reset meanwhile).
            pattern = rf'ubc_witness_requests_total\{{status="409",witness="{cosigner.name}"\}}'
            before = metric(ledger, pattern)
            assert before is not None
            ledger.grow(1)
            next_round(ledger)
            assert metric(ledger, pattern) == before + 1
            assert witness_status(ledger, cosigner.name)["status"] == "ahead"


def test_a_witness_that_is_down_blocks_nothing_and_catches_up(db_url: str, tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "data")
    vkey = ledger_vkey(data_dir)
    cosigner = new_cosigner("witness.test/w1")
    port = _free_port()  # nothing listens there yet
    url = f"http://127.0.0.1:{port}"
    with ledger_with(db_url, data_dir, setting((cosigner, url))) as ledger:
        started = time.monotonic()
        ledger.grow(2)
        assert time.monotonic() - started < 10
        next_round(ledger)
        assert cosignature_lines(ledger.checkpoint()) == []
        mine = witness_status(ledger, cosigner.name)
        assert mine["status"] == "unreachable"
        assert mine["cosigned_size"] is None
        assert ledger.client.get("/journal/checkpoint/cosigned").status_code == 404
        unreachable = metric(
            ledger,
            rf'ubc_witness_requests_total\{{status="unreachable",witness="{cosigner.name}"\}}',
        )
        assert unreachable is not None
        assert unreachable >= 1
        ledger.grow(1)
        with run_witness(tmp_path / "w1.db", cosigner, vkey, port):
            next_round(ledger)
            note = ledger.checkpoint()
            assert WitnessPolicy.from_vkeys([cosigner.vkey]).check(note).ok
            assert witness_status(ledger, cosigner.name)["status"] == "cosigned"


def test_a_witness_that_hangs_times_out_while_writes_go_on(db_url: str, tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "data")
    cosigner = new_cosigner("witness.test/slow")
    release = threading.Event()

    async def hang(_request: Request) -> Response:
        import asyncio

        for _ in range(100):
            if release.is_set():
                break
            await asyncio.sleep(0.05)
        return PlainTextResponse("late\n", status_code=503)

    slow = Starlette(routes=[Route("/add-checkpoint", hang, methods=["POST"])])
    with (
        serve_asgi(slow, _free_port()) as url,
        ledger_with(
            db_url, data_dir, setting((cosigner, url)), witness_timeout_seconds=1.0
        ) as ledger,
    ):
        ledger.grow(1)
        ledger.server.clock.advance(INTERVAL)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (run_round(ledger.server), done.set()))
        worker.start()
        try:
            # While the witness does not answer, writes are served as usual.
            for _ in range(3):
                started = time.monotonic()
                ledger.grow(1)
                assert time.monotonic() - started < 2
            worker.join(timeout=30)
            assert done.is_set()
        finally:
            release.set()
        assert witness_status(ledger, cosigner.name)["status"] == "timeout"
        assert cosignature_lines(ledger.checkpoint()) == []


def test_a_bad_cosignature_is_not_stored(db_url: str, tmp_path: Path) -> None:
    """A witness answering 200 with a line of its key that does not verify (or no line
    of its key at all): refused, logged, counted, not stored."""
    data_dir = make_data_dir(tmp_path / "data")
    cosigner = new_cosigner("witness.test/liar")
    stranger = new_cosigner("witness.test/stranger")
    answers = ["forged"]

    async def lie(request: Request) -> Response:
        body = (await request.body()).decode()
        note = body.split("\n\n", 1)[1]
        checkpoint = body_of(note)
        if answers[0] == "forged":
            line = cosigner.sign(checkpoint, 1_800_000_000)
            name, encoded = line.removeprefix("\u2014 ").removesuffix("\n").split(" ")
            raw = bytearray(base64.b64decode(encoded))
            raw[-1] ^= 1
            return PlainTextResponse(f"\u2014 {name} {base64.b64encode(bytes(raw)).decode()}\n")
        return PlainTextResponse(stranger.sign(checkpoint, 1_800_000_000))

    liar = Starlette(routes=[Route("/add-checkpoint", lie, methods=["POST"])])
    with (
        serve_asgi(liar, _free_port()) as url,
        ledger_with(db_url, data_dir, setting((cosigner, url))) as ledger,
    ):
        ledger.grow(1)
        next_round(ledger)
        assert cosignature_lines(ledger.checkpoint()) == []
        mine = witness_status(ledger, cosigner.name)
        assert mine["status"] == "bad_cosignature"
        assert "does not verify" in str(mine["error"])
        bad = metric(
            ledger,
            rf'ubc_witness_requests_total\{{status="bad_cosignature",witness="{cosigner.name}"\}}',
        )
        assert bad is not None
        assert bad >= 1
        answers[0] = "stranger"
        ledger.grow(1)
        next_round(ledger)
        assert cosignature_lines(ledger.checkpoint()) == []
        assert "no cosignature of its key" in str(witness_status(ledger, cosigner.name)["error"])
        assert ledger.client.get("/journal/checkpoint/cosigned").status_code == 404


# --- two witnesses -----------------------------------------------------------------------


def test_two_witnesses_and_a_quorum_of_two(db_url: str, tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "data")
    vkey = ledger_vkey(data_dir)
    first, second = new_cosigner("witness.test/w1"), new_cosigner("witness.test/w2")
    port2 = _free_port()
    token = ""
    with run_witness(tmp_path / "w1.db", first, vkey) as w1:
        configured = setting((first, w1.url), (second, f"http://127.0.0.1:{port2}"))
        with ledger_with(db_url, data_dir, configured, witness_quorum=2) as ledger:
            token = ledger.server.auditor_token
            with run_witness(tmp_path / "w2.db", second, vkey, port2):
                ledger.grow(2)
                next_round(ledger)
                note = ledger.checkpoint()
                both = WitnessPolicy.from_vkeys([first.vkey, second.vkey], 2).check(note)
                assert both.ok, both.summary()
                # Lines in the configured order, after the ledger's.
                names = [line.split(" ")[1] for line in cosignature_lines(note)]
                assert names == [first.name, second.name]
                code, output = cli(
                    "audit", "verify", ledger.server.url, "--vkey", vkey, "--token", token,
                    "--witness", first.vkey, "--witness", second.vkey, "--quorum", "2",
                )  # fmt: skip
                assert code == 0, output
                witnessed = size_of(note)
            # The second witness goes away; the first keeps cosigning new checkpoints.
            ledger.grow(1)
            next_round(ledger)
            latest = ledger.checkpoint()
            assert size_of(latest) == witnessed + 2
            assert [line.split(" ")[1] for line in cosignature_lines(latest)] == [first.name]
            assert not WitnessPolicy.from_vkeys([first.vkey, second.vkey], 2).check(latest).ok
            # The witnessed checkpoint (quorum 2) is still the earlier one, with both lines.
            cosigned = ledger.client.get("/journal/checkpoint/cosigned")
            assert cosigned.status_code == 200
            assert size_of(cosigned.text) == witnessed
            assert WitnessPolicy.from_vkeys([first.vkey, second.vkey], 2).check(cosigned.text).ok
            assert status(ledger)["witnessed_size"] == witnessed
            assert witness_status(ledger, second.name)["status"] == "unreachable"
            # A receipt of an entry it covers is made against it; one of a newer entry
            # cannot be witnessed by both yet.
            receipt = tmp_path / "proof.tlog-proof"
            code, output = cli(
                "proof", "get", "2", "--server", ledger.server.url, "--token", token,
                "--witness", first.vkey, "--witness", second.vkey, "-o", str(receipt),
            )  # fmt: skip
            assert code == 0, output
            assert size_of(parse_tlog_proof(receipt.read_text()).checkpoint) == witnessed
            code, output = cli(
                "proof", "check", str(receipt), "--vkey", vkey,
                "--witness", first.vkey, "--witness", second.vkey, "--quorum", "2",
            )  # fmt: skip
            assert code == 0, output
            code, output = cli(
                "proof", "get", str(witnessed), "--server", ledger.server.url, "--token", token,
                "--witness", first.vkey, "--witness", second.vkey, "-o", str(receipt),
            )  # fmt: skip
            assert code == 1
            assert "1 of 2 witnesses cosigned" in output
            # Without --witness, the receipt still carries what cosignatures there are.
            code, output = cli(
                "proof", "get", str(witnessed), "--server", ledger.server.url, "--token", token,
                "-o", str(receipt),
            )  # fmt: skip
            assert code == 0, output
            assert first.name in parse_tlog_proof(receipt.read_text()).checkpoint


# --- the configuration -------------------------------------------------------------------


def test_the_witnesses_setting_is_checked() -> None:
    one, two = new_cosigner("w.test/1"), new_cosigner("w.test/2")
    parsed = parse_witnesses(f" {one.vkey}@http://127.0.0.1:1/w/ , {two.vkey}@https://x.test ")
    assert [(e.name, e.url) for e in parsed] == [
        (one.name, "http://127.0.0.1:1/w"),
        (two.name, "https://x.test"),
    ]
    assert parse_witnesses("") == ()
    assert witnessing_of(parsed, None, 10).quorum == 2
    assert witnessing_of(parsed, 1, 10).quorum == 1
    secret = parse_witnesses(f"{one.vkey}@https://user:pw@x.test:8443/w")
    assert secret[0].public_url == "https://x.test:8443/w"
    ledger_key = NoteSigner("w.test/1", SigningKey.generate()).vkey
    for bad, message in (
        (one.vkey, "is not <vkey>@<url>"),
        (f"{ledger_key}@http://x.test", "type 0x01"),
        (f"{one.vkey}@ftp://x.test", "not http"),
        (f"{one.vkey}@http://x.test?a=1", "query"),
        (f"{one.vkey}@http://x.test,{one.vkey}@http://y.test", "same key"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_witnesses(bad)
    with pytest.raises(ValueError, match="UBC_WITNESS_QUORUM"):
        witnessing_of(parsed, 3, 10)


def test_without_witnesses_nothing_changes(db_url: str, tmp_path: Path) -> None:
    with (
        run_server(db_url, make_data_dir(tmp_path / "data")) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        note = client.get("/journal/checkpoint").text
        assert len(note.split("\n\n", 1)[1].splitlines()) == 1
        assert client.get("/journal/checkpoint/cosigned").status_code == 404
        body = client.get("/journal/witnesses").json()
        assert body["witnesses"] == []
        assert json.dumps(body)


# --- several processes on one database ---------------------------------------------------


def test_one_round_at_a_time_and_per_interval_across_processes(db_url: str, tmp_path: Path) -> None:
    """Another process's rounds (another :class:`WitnessRounds` on the same database):
    the interval is shared through the database (the leader lock that keeps the other
    processes' loops out is tested in tests/test_hosts.py)."""
    data_dir = make_data_dir(tmp_path / "data")
    vkey = ledger_vkey(data_dir)
    cosigner = new_cosigner("witness.test/w1")
    with run_witness(tmp_path / "w1.db", cosigner, vkey) as witness:
        configured = setting((cosigner, witness.url))
        with ledger_with(db_url, data_dir, configured) as ledger:
            engine = make_engine(db_url)
            try:
                other = WitnessRounds(
                    parse_witnesses(configured),
                    quorum=1,
                    interval=INTERVAL,
                    timeout=2.0,
                    sessions=make_session_factory(engine),
                    engine=engine,
                    clock=ledger.server.clock,
                )
                ours = rounds(ledger.server)
                ledger.grow(1)
                ledger.server.clock.advance(INTERVAL)
                # This process's task is kept out (as if it were busy elsewhere).
                assert ours._lock.acquire(timeout=30)
                try:
                    assert other.tick_blocking() == "done"
                finally:
                    ours._lock.release()
                assert WitnessPolicy.from_vkeys([cosigner.vkey]).check(ledger.checkpoint()).ok
                assert settle(ours) == "idle"
                # The other process's round counts for this one's interval too.
                ledger.grow(1)
                assert settle(ours) == "not_due"
                assert settle(other) == "not_due"
                ledger.server.clock.advance(INTERVAL)
                assert run_round(ledger.server) in ("done", "idle")
                assert WitnessPolicy.from_vkeys([cosigner.vkey]).check(ledger.checkpoint()).ok
            finally:
                engine.dispose()


def test_ubc_serve_refuses_a_bad_witness_setting(tmp_path: Path) -> None:
    ledger_key = NoteSigner("w.test/1", generate_signing_key()).vkey
    for value, quorum, message in (
        (f"{ledger_key}@http://127.0.0.1:9", "", "type 0x01"),
        ("nonsense", "", "is not <vkey>@<url>"),
        (f"{new_cosigner('w.test/1').vkey}@http://127.0.0.1:9", "2", "UBC_WITNESS_QUORUM"),
    ):
        env = {
            "UBC_WITNESSES": value,
            "UBC_DATABASE_URL": f"sqlite:///{tmp_path / 'ubc.db'}",
            "UBC_DATA_DIR": str(tmp_path / "data"),
            **({"UBC_WITNESS_QUORUM": quorum} if quorum else {}),
        }
        get_settings.cache_clear()
        result = CliRunner().invoke(cli_app, ["serve", "--port", "9"], env=env)
        assert result.exit_code == 1, result.output
        assert message in " ".join(result.output.split())
        assert not (tmp_path / "ubc.db").exists()


# --- under load ----------------------------------------------------------------------------


def test_cosignatures_are_collected_under_load(db_url: str, tmp_path: Path) -> None:
    """Writers keep writing while rounds run: every round stores a cosignature that
    verifies on the checkpoint it was given, and the last one covers everything."""
    data_dir = make_data_dir(tmp_path / "data")
    vkey = ledger_vkey(data_dir)
    cosigner = new_cosigner("witness.test/w1")
    policy = WitnessPolicy.from_vkeys([cosigner.vkey])
    with run_witness(tmp_path / "w1.db", cosigner, vkey) as witness:
        # Envelopes are dated by the wall clock, the ledger's clock moves on by rounds.
        with ledger_with(
            db_url, data_dir, setting((cosigner, witness.url)), created_at_skew_seconds=3600
        ) as ledger:
            stop = threading.Event()
            failures: list[BaseException] = []

            def write() -> None:
                try:
                    with httpx.Client(base_url=ledger.server.url, timeout=30) as client:
                        writer = Ledger(ledger.server, client)
                        while not stop.is_set():
                            writer.grow(1)
                except BaseException as exc:  # reported below
                    failures.append(exc)

            writers = [threading.Thread(target=write) for _ in range(3)]
            for thread in writers:
                thread.start()
            sizes = []
            try:
                for _ in range(6):
                    time.sleep(0.2)  # let the writers move the checkpoint on
                    next_round(ledger)
                    cosigned = ledger.client.get("/journal/checkpoint/cosigned")
                    assert cosigned.status_code == 200, cosigned.text
                    assert policy.check(cosigned.text).ok
                    assert NoteVerifier.from_vkey(vkey).verify(cosigned.text)
                    sizes.append(size_of(cosigned.text))
            finally:
                stop.set()
                for thread in writers:
                    thread.join(timeout=60)
            assert not failures, failures
            assert sizes == sorted(sizes)
            assert len(set(sizes)) > 1
            next_round(ledger)
            latest = ledger.checkpoint()
            assert policy.check(latest).ok
            stored = witness.store.get(ORIGIN)
            assert stored is not None
            assert stored.size == size_of(latest)
