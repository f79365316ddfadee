"""``ubc witness``: a C2SP tlog-witness for peer ledgers (issue 18, item 2).

A real ledger (served on loopback, SQLite and PostgreSQL) produces checkpoints and
consistency proofs; a real witness (its app served on loopback, its table in the same
database, which also shows it stays out of the ledger's schema) cosigns them over HTTP.
Every refusal is checked against the status code C2SP tlog-witness gives for it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey
from typer.testing import CliRunner

from tests.conftest import LiveServer, make_data_dir, run_server, serve_asgi
from ubc.cli import app as cli_app
from ubc.db import make_engine
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import sign_payload
from ubc.journal.checkpoint import format_checkpoint, parse_checkpoint
from ubc.journal.merkle import MemoryHashStore, append_leaves, consistency_proof, leaf_hash
from ubc.journal.merkle import root as tree_root
from ubc.signing import NoteSigner, NoteVerifier, encode_public_key, generate_signing_key
from ubc.signing.keys import load_signing_key
from ubc.witness.app import create_witness_app
from ubc.witness.cosignature import (
    CosignatureError,
    CosignatureVerifier,
    Cosigner,
    cosignature_key_id,
    cosigned_message,
)
from ubc.witness.protocol import (
    SIZE_CONTENT_TYPE,
    Witness,
    WitnessRefusal,
    format_add_checkpoint,
    parse_add_checkpoint,
    parse_log_option,
)
from ubc.witness.store import WitnessStore, witness_checkpoints

ORIGIN = "test.ubc/ledger"
WITNESS_NAME = "witness.test/w1"


# --- the ledger ----------------------------------------------------------------------------


def envelope(type_: str, keys: list[SigningKey], **fields: Any) -> dict[str, Any]:
    body = {
        "ledger": ORIGIN,
        "id": str(uuid.uuid4()),
        "created_at": format_timestamp(datetime.now(UTC)),
        **fields,
    }
    return sign_payload(validate_payload(type_, body), type_, keys).to_json()


@dataclass
class Ledger:
    server: LiveServer
    client: httpx.Client

    @property
    def vkey(self) -> str:
        vkey: str = self.client.get("/api/ledger").json()["vkey"]
        return vkey

    def grow(self, members: int = 1) -> None:
        """Append entries: each new member is registered and admitted (two entries)."""
        for _ in range(members):
            handle = f"m{uuid.uuid4().hex[:10]}"
            key = generate_signing_key()
            for env in (
                envelope(
                    "member.register",
                    [key],
                    actor=f"member:{handle}",
                    handle=handle,
                    public_key=encode_public_key(bytes(key.verify_key)),
                ),
                envelope(
                    "member.admit",
                    [self.server.operator_key],
                    actor="operator",
                    handle=handle,
                    tier="basic",
                ),
            ):
                answer = self.client.post("/api/envelopes", json=env)
                assert answer.status_code == 201, answer.text

    def checkpoint(self) -> str:
        answer = self.client.get("/journal/checkpoint")
        assert answer.status_code == 200, answer.text
        return answer.text

    def proof(self, old: int, new: int) -> list[bytes]:
        answer = self.client.get("/journal/proof/consistency", params={"old": old, "new": new})
        assert answer.status_code == 200, answer.text
        return [base64.b64decode(h) for h in answer.json()["proof"]]

    def sign(self, body: str) -> str:
        """A checkpoint body signed with the ledger's own key (for forgeries)."""
        return NoteSigner(ORIGIN, self.server.ledger_key).sign(body)


def size_of(note: str) -> int:
    return parse_checkpoint(note.split("\n\n")[0] + "\n").size


def body_of(note: str) -> str:
    return note[: note.rfind("\n\n") + 1]


# --- the witness ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    witness: Witness
    client: httpx.Client

    @property
    def vkey(self) -> str:
        return self.witness.cosigner.vkey

    def add(self, old: int, proof: list[bytes], note: str) -> httpx.Response:
        return self.post(format_add_checkpoint(old, proof, note).encode())

    def post(self, body: bytes) -> httpx.Response:
        return self.client.post("/add-checkpoint", content=body)


@contextlib.contextmanager
def run_witness(db_url: str, logs: dict[str, list[NoteVerifier]]) -> Iterator[Served]:
    engine = make_engine(db_url)
    store = WitnessStore(engine)
    store.create()
    witness = Witness(Cosigner(WITNESS_NAME, generate_signing_key()), logs, store)
    with (
        serve_asgi(create_witness_app(witness)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield Served(url, witness, client)
        engine.dispose()


@pytest.fixture
def ledger(db_url: str, tmp_path: Path) -> Iterator[Ledger]:
    with (
        run_server(db_url, make_data_dir(tmp_path / "data")) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield Ledger(server, client)


@pytest.fixture
def witness(db_url: str, ledger: Ledger) -> Iterator[Served]:
    with run_witness(db_url, {ORIGIN: [NoteVerifier.from_vkey(ledger.vkey)]}) as served:
        yield served


def cosigned(answer: httpx.Response, note: str, served: Served) -> str:
    """The note with the witness's cosignature lines appended, checked."""
    assert answer.status_code == 200, answer.text
    lines = answer.text.splitlines(keepends=True)
    assert lines
    assert all(line.startswith("\u2014 ") and line.endswith("\n") for line in lines)
    return note + answer.text


# --- cosignatures, without HTTP ------------------------------------------------------------


def test_cosignature_format_follows_the_spec() -> None:
    key = generate_signing_key()
    cosigner = Cosigner(WITNESS_NAME, key)
    public = bytes(key.verify_key)
    # The key ID and vkey, computed here from the spec's definitions.
    key_id = hashlib.sha256(WITNESS_NAME.encode() + b"\n\x04" + public).digest()[:4]
    assert cosigner.key_id == key_id == cosignature_key_id(WITNESS_NAME, public)
    encoded = base64.b64encode(b"\x04" + public).decode()
    assert cosigner.vkey == f"{WITNESS_NAME}+{key_id.hex()}+{encoded}"
    body = format_checkpoint("example.com/log", 7, b"\x11" * 32)
    line = cosigner.sign(body, 1679315147)
    name, raw_b64 = line.removeprefix("\u2014 ").removesuffix("\n").split(" ")
    raw = base64.b64decode(raw_b64)
    assert name == WITNESS_NAME
    assert len(raw) == 4 + 8 + 64
    assert raw[:4] == key_id
    assert int.from_bytes(raw[4:12], "big") == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + body.encode()
    assert cosigned_message(body, 1679315147) == message
    key.verify_key.verify(message, raw[12:])  # a plain Ed25519 signature of that message

    verifier = CosignatureVerifier.from_vkey(cosigner.vkey)
    note = NoteSigner("example.com/log", generate_signing_key()).sign(body) + line
    assert verifier.verify(note).timestamp == 1679315147
    # A different body, another key of the same name, a signed-note (0x01) vkey: refused.
    other = body.replace("\n7\n", "\n8\n")
    with pytest.raises(CosignatureError, match="does not verify"):
        verifier.verify(NoteSigner("example.com/log", key).sign(other) + line)
    with pytest.raises(CosignatureError, match="no cosignature"):
        CosignatureVerifier(WITNESS_NAME, bytes(generate_signing_key().verify_key)).verify(note)
    with pytest.raises(CosignatureError, match="type 0x01"):
        CosignatureVerifier.from_vkey(NoteSigner(WITNESS_NAME, key).vkey)


def test_the_request_parser_is_strict() -> None:
    note = "example.com/log\n1\n" + "A" * 43 + "=\n\n\u2014 k AAAA\n"
    h = base64.b64encode(b"\x01" * 32).decode()
    assert parse_add_checkpoint(f"old 0\n\n{note}".encode()).old == 0
    parsed = parse_add_checkpoint(f"old 12\n{h}\n{h}\n\n{note}".encode())
    assert (parsed.old, parsed.proof, parsed.note) == (12, (b"\x01" * 32,) * 2, note)
    for bad in (
        "",
        "old 0",
        "old 0\n",
        f"old 0\n{note}",  # no empty line after the old size
        f"old 01\n\n{note}",
        f"old -1\n\n{note}",
        f"old  1\n\n{note}",
        f"Old 1\n\n{note}",
        f"old 1\n{h[:-1]}\n\n{note}",
        f"old 1\n{base64.b64encode(b'x' * 31).decode()}\n\n{note}",
        f"old 1\n{h} \n\n{note}",
        "old 1\n" + f"{h}\n" * 64 + f"\n{note}",
        "old 1\n\n",
    ):
        with pytest.raises(WitnessRefusal) as info:
            parse_add_checkpoint(bad.encode())
        assert info.value.status == 400, bad
    assert len(parse_add_checkpoint(("old 1\n" + f"{h}\n" * 63 + f"\n{note}").encode()).proof)


def test_log_options() -> None:
    vkey = NoteSigner(ORIGIN, generate_signing_key()).vkey
    origin, verifier = parse_log_option(f"{ORIGIN}={vkey}")
    assert (origin, verifier.vkey) == (ORIGIN, vkey)
    for bad in (vkey, f"={vkey}", f"{ORIGIN}=", f"{ORIGIN}=nonsense", f"a b={vkey}"):
        with pytest.raises(ValueError, match="ORIGIN=VKEY|vkey|origin"):
            parse_log_option(bad)


def test_the_witness_table_is_not_in_the_ledger_schema() -> None:
    from ubc.models import metadata

    assert witness_checkpoints.name not in metadata.tables
    assert witness_checkpoints.metadata is not metadata


# --- over HTTP, with a real ledger ---------------------------------------------------------


def test_the_witness_cosigns_a_growing_ledger(ledger: Ledger, witness: Served) -> None:
    first = ledger.checkpoint()
    n1 = size_of(first)
    answer = witness.add(0, [], first)
    note = cosigned(answer, first, witness)
    # The cosignature verifies with the witness's vkey, and the ledger's signature with
    # the ledger's vkey alone: signed-note verifiers ignore lines of other keys.
    stamp = CosignatureVerifier.from_vkey(witness.vkey).verify(note)
    assert abs(stamp.timestamp - time.time()) < 60
    assert NoteVerifier.from_vkey(ledger.vkey).verify(note) == body_of(first)

    ledger.grow(3)
    second = ledger.checkpoint()
    n2 = size_of(second)
    assert n2 > n1
    note2 = cosigned(witness.add(n1, ledger.proof(n1, n2), second), second, witness)
    CosignatureVerifier.from_vkey(witness.vkey).verify(note2)
    NoteVerifier.from_vkey(ledger.vkey).verify(note2)

    # The same checkpoint again (old = its size, empty proof) is cosigned again.
    cosigned(witness.add(n2, [], second), second, witness)
    # The witness kept the checkpoint as received, with its size and root.
    stored = witness.witness.store.get(ORIGIN)
    assert stored is not None
    assert (stored.size, stored.checkpoint) == (n2, second)
    assert stored.root_hash == parse_checkpoint(body_of(second)).root
    # A checkpoint carrying a cosignature is accepted (extra lines are ignored).
    ledger.grow(1)
    third = ledger.checkpoint()
    n3 = size_of(third)
    cosigned(witness.add(n2, ledger.proof(n2, n3), note2.replace(second, third)), third, witness)


def test_refusals_have_the_spec_status_codes(ledger: Ledger, witness: Served) -> None:
    first = ledger.checkpoint()
    n1 = size_of(first)
    proof_hash = base64.b64decode(base64.b64encode(b"\x07" * 32))
    # Before anything is stored: a proof with old 0 must be empty (it cannot verify).
    assert witness.add(0, [proof_hash], first).status_code == 422
    cosigned(witness.add(0, [], first), first, witness)
    ledger.grow(3)
    second = ledger.checkpoint()
    n2 = size_of(second)
    proof = ledger.proof(n1, n2)

    # A wrong old size: 409, the witness's size, Content-Type text/x.tlog.size exactly.
    for old in (0, n1 - 1, n1 + 1):
        if old == n1:
            continue
        answer = witness.add(old, proof if old else [], second)
        assert answer.status_code == 409, (old, answer.text)
        assert answer.headers["content-type"] == SIZE_CONTENT_TYPE
        assert answer.text == f"{n1}\n"
    # An old size beyond the checkpoint's: 400.
    assert witness.add(n2 + 1, proof, second).status_code == 400

    # A bad proof: a flipped hash, a proof for other sizes, a forged root.
    flipped = bytearray(proof[0])
    flipped[0] ^= 1
    assert witness.add(n1, [bytes(flipped), *proof[1:]], second).status_code == 422
    assert witness.add(n1, proof[:-1], second).status_code == 422
    ledger.grow(1)
    third = ledger.checkpoint()
    n3 = size_of(third)
    assert witness.add(n1, ledger.proof(n1, n3), second).status_code == 422
    assert witness.add(n1, ledger.proof(n1 + 1, n2), second).status_code == 422
    forged = ledger.sign(format_checkpoint(ORIGIN, n2, hashlib.sha256(b"forged").digest()))
    assert witness.add(n1, proof, forged).status_code == 422
    # Nothing of that was stored.
    assert witness.witness.store.size(ORIGIN) == n1

    cosigned(witness.add(n1, proof, second), second, witness)
    # Shrinking: the earlier checkpoint with the witness's size as old (400: old is over
    # the checkpoint's size), or with its own size (409: not the witness's size).
    assert witness.add(n2, [], first).status_code == 400
    answer = witness.add(n1, [], first)
    assert (answer.status_code, answer.text) == (409, f"{n2}\n")
    # The same size with another root, signed by the ledger's key: 409 (a fork).
    fork = ledger.sign(format_checkpoint(ORIGIN, n2, hashlib.sha256(b"fork").digest()))
    answer = witness.add(n2, [], fork)
    assert answer.status_code == 409
    assert answer.headers["content-type"] != SIZE_CONTENT_TYPE

    # An unknown origin: 404.
    other = NoteSigner("other.example/log", generate_signing_key())
    unknown = other.sign(format_checkpoint("other.example/log", 1, b"\x00" * 32))
    assert witness.add(0, [], unknown).status_code == 404
    # A signature by another key, even under the ledger's name: 403.
    stranger = NoteSigner(ORIGIN, generate_signing_key())
    assert witness.add(n2, [], stranger.sign(body_of(second))).status_code == 403
    # The ledger's signature tampered with: 403; next to a good one, still 403.
    good_line = second[len(body_of(second)) + 1 :]
    raw = bytearray(base64.b64decode(good_line.split(" ")[-1]))
    raw[-1] ^= 1
    bad_line = f"\u2014 {ORIGIN} {base64.b64encode(bytes(raw)).decode()}\n"
    assert witness.add(n2, [], body_of(second) + "\n" + bad_line).status_code == 403
    assert witness.add(n2, [], second + bad_line).status_code == 403
    # Malformed bodies: 400.
    for body in (
        b"",
        b"old 0\n",
        f"old {n2}\n{second}".encode(),
        f"old 0{n2}\n\n{second}".encode(),
        f"old {n2}\n\n{body_of(second)}".encode(),  # no signatures
        f"old {n2}\n\nnot a checkpoint\n\n{good_line}".encode(),
        b"old 1\n\n\xff\xfe\n",
    ):
        assert witness.post(body).status_code == 400, body
    assert witness.post(b"x" * (65 * 1024)).status_code == 413
    # GET is not the protocol.
    assert witness.client.get("/add-checkpoint").status_code == 405
    # Through all of it the witness kept the last good checkpoint.
    assert witness.witness.store.size(ORIGIN) == n2


def send_at_once(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    """POST the bodies to /add-checkpoint from one thread each, released together."""
    barrier = threading.Barrier(len(bodies))
    answers: list[httpx.Response] = []

    def send(body: bytes) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            client.get("/")  # connected before the race starts
            barrier.wait()
            answers.append(client.post("/add-checkpoint", content=body))

    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_concurrent_requests_with_the_same_old_size(ledger: Ledger, witness: Served) -> None:
    """Two add-checkpoint requests with the same old size at once: one 200, one 409."""
    note = ledger.checkpoint()
    cosigned(witness.add(0, [], note), note, witness)
    for _ in range(4):
        old = size_of(note)
        ledger.grow(1)
        a = ledger.checkpoint()
        ledger.grow(1)
        b = ledger.checkpoint()
        bodies = [
            format_add_checkpoint(old, ledger.proof(old, size_of(n)), n).encode() for n in (a, b)
        ]
        answers = send_at_once(witness.url, bodies)
        assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
        won = next(r for r in answers if r.status_code == 200)
        lost = next(r for r in answers if r.status_code == 409)
        stored = witness.witness.store.get(ORIGIN)
        assert stored is not None
        assert lost.text == f"{stored.size}\n"
        note = stored.checkpoint
        CosignatureVerifier.from_vkey(witness.vkey).verify(note + won.text)


def test_the_store_swaps_atomically(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        store = WitnessStore(engine)
        store.create()
        store.create()  # idempotent
        args: dict[str, Any] = {"root_hash": b"\x01" * 32, "checkpoint": "c\n"}
        assert store.swap("o", 0, size=5, **args)
        assert not store.swap("o", 0, size=6, **args)  # the first one is there
        assert store.swap("o", 5, size=9, **args)
        assert not store.swap("o", 5, size=7, **args)
        assert store.size("o") == 9
        assert store.size("p") == 0

        results: list[bool] = []
        barrier = threading.Barrier(8)

        def swap(size: int) -> None:
            barrier.wait()
            results.append(store.swap("o", 9, size=size, **args))

        threads = [threading.Thread(target=swap, args=(10 + i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 7 + [True]
    finally:
        engine.dispose()


# --- the command line ----------------------------------------------------------------------


def test_witness_init_and_vkey(tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "witness.key"
    result = runner.invoke(cli_app, ["witness", "init", "--key", str(key), "--name", WITNESS_NAME])
    assert result.exit_code == 0, result.output
    assert key.stat().st_mode & 0o777 == 0o600
    vkey = Cosigner(WITNESS_NAME, load_signing_key(key)).vkey
    assert vkey in result.output.replace("\n", "")
    result = runner.invoke(cli_app, ["witness", "vkey", "--key", str(key), "--name", WITNESS_NAME])
    assert (result.exit_code, result.output) == (0, vkey + "\n")
    before = key.read_bytes()
    result = runner.invoke(cli_app, ["witness", "init", "--key", str(key), "--name", WITNESS_NAME])
    assert result.exit_code == 1
    assert "never overwritten" in result.output
    assert key.read_bytes() == before
    result = runner.invoke(cli_app, ["witness", "vkey", "--key", str(key), "--name", "a b"])
    assert result.exit_code == 1
    assert "--name" in result.output


def test_witness_serve_refuses_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "witness.key"
    runner.invoke(cli_app, ["witness", "init", "--key", str(key), "--name", WITNESS_NAME])
    vkey = NoteSigner(ORIGIN, generate_signing_key()).vkey
    db = f"sqlite:///{tmp_path / 'w.db'}"
    base = ["witness", "serve", "--name", WITNESS_NAME, "--database-url", db]
    cases = [
        (["--key", str(tmp_path / "none.key"), "--log", f"{ORIGIN}={vkey}"], "no key file"),
        (["--key", str(key)], "--log"),
        (["--key", str(key), "--log", vkey], "ORIGIN=VKEY"),
        (["--key", str(key), "--log", f"{ORIGIN}=x+y+z"], "vkey"),
        (["--key", str(key), "--log", f"{ORIGIN}={vkey}", "--log", f"{ORIGIN}={vkey}"], "twice"),
    ]
    for args, words in cases:
        result = runner.invoke(cli_app, [*base, *args])
        assert result.exit_code != 0, args
        assert words in result.output, (args, result.output)
    bad_db = ["--database-url", "nonsense://", "--key", str(key), "--log", f"{ORIGIN}={vkey}"]
    result = runner.invoke(cli_app, ["witness", "serve", "--name", WITNESS_NAME, *bad_db])
    assert result.exit_code == 1
    assert "database" in result.output


def test_ubc_witness_serve_cosigns(ledger: Ledger, db_url: str, tmp_path: Path) -> None:
    """The command itself, in a process of its own, on the engine of this run."""
    key = tmp_path / "witness.key"
    CliRunner().invoke(cli_app, ["witness", "init", "--key", str(key), "--name", WITNESS_NAME])
    port = _free_port()
    args = [sys.executable, "-c", "from ubc.cli import main; main()", "witness", "serve"]
    args += ["--key", str(key), "--name", WITNESS_NAME, "--log", f"{ORIGIN}={ledger.vkey}"]
    args += ["--database-url", db_url, "--port", str(port)]
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ)
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                about = httpx.get(url + "/", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the witness did not start"
                time.sleep(0.1)
        vkey = Cosigner(WITNESS_NAME, load_signing_key(key)).vkey
        assert f"vkey {vkey}\n" in about.text
        assert f"log {ORIGIN}\n" in about.text
        note = ledger.checkpoint()
        answer = httpx.post(url + "/add-checkpoint", content=format_add_checkpoint(0, [], note))
        assert answer.status_code == 200, answer.text
        CosignatureVerifier.from_vkey(vkey).verify(note + answer.text)
    finally:
        process.terminate()
        process.communicate(timeout=20)  # also closes the pipe


def test_a_request_that_loses_the_swap_gets_409(ledger: Ledger, db_url: str) -> None:
    """The race of tlog-witness: a request checked against size N whose write comes after
    another request moved the origin on is refused, never rolls the witness back."""
    engine = make_engine(db_url)
    try:
        store = WitnessStore(engine)
        store.create()
        witness = Witness(
            Cosigner(WITNESS_NAME, generate_signing_key()),
            {ORIGIN: [NoteVerifier.from_vkey(ledger.vkey)]},
            store,
        )
        first = ledger.checkpoint()
        n1 = size_of(first)
        witness.add_checkpoint(parse_add_checkpoint(format_add_checkpoint(0, [], first).encode()))
        ledger.grow(1)
        a = ledger.checkpoint()
        ledger.grow(1)
        b = ledger.checkpoint()
        stale = store.get(ORIGIN)
        requests = [
            parse_add_checkpoint(
                format_add_checkpoint(n1, ledger.proof(n1, size_of(n)), n).encode()
            )
            for n in (b, a)
        ]
        witness.add_checkpoint(requests[0])  # b wins
        # a was checked while the store still said n1 ...
        reads = iter([stale])
        real_get = store.get
        store.get = lambda origin: next(reads, None) or real_get(origin)  # type: ignore[method-assign]
        with pytest.raises(WitnessRefusal) as info:
            witness.add_checkpoint(requests[1])
        assert (info.value.status, info.value.size) == (409, size_of(b))
        del store.get
        assert store.size(ORIGIN) == size_of(b)
    finally:
        engine.dispose()


def test_the_worked_example_of_the_docs(tmp_path: Path) -> None:
    """docs/witness.md section 5, recomputed: keys from fixed seeds, a fixed clock."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "witness.md").read_text()
    origin = "ubc.example.org/ledger"
    log = NoteSigner(origin, SigningKey(hashlib.sha256(b"example ledger key").digest()))
    cosigner = Cosigner(
        "witness.example.org/w1", SigningKey(hashlib.sha256(b"example witness key").digest())
    )
    hashes = MemoryHashStore()
    nodes, frontier = append_leaves(0, [], [leaf_hash(b"entry %d" % i) for i in range(4)])
    hashes.add(nodes)
    nodes, frontier = append_leaves(4, frontier, [leaf_hash(b"entry %d" % i) for i in range(4, 7)])
    hashes.add(nodes)
    c4 = log.sign(format_checkpoint(origin, 4, tree_root(4, hashes)))
    c7 = log.sign(format_checkpoint(origin, 7, tree_root(7, hashes)))
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        store = WitnessStore(engine)
        store.create()
        witness = Witness(cosigner, {origin: [log.verifier()]}, store, clock=lambda: 1796313600)
        assert log.vkey in doc
        assert cosigner.vkey in doc
        first = format_add_checkpoint(0, [], c4)
        second = format_add_checkpoint(4, consistency_proof(4, 7, hashes), c7)
        for request in (first, second):
            answer = witness.handle(request.encode())
            assert answer.status == 200
            assert f"```\n{request}```" in doc
            assert f"```\n{answer.body}```" in doc
        again = witness.handle(second.encode())
        assert (again.status, again.content_type, again.body) == (409, SIZE_CONTENT_TYPE, "7\n")
        # The Python snippet runs as shown, and prints what its comment says.
        snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
        printed: list[str] = []
        exec(snippet, {"print": lambda *a: printed.append(" ".join(map(str, a)))})  # noqa: S102
        assert printed == ["witness.example.org/w1 1796313600"]
    finally:
        engine.dispose()
