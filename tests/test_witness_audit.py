"""Auditors and members require witnesses; a split view is caught (issue 18, items 3, 4).

A real ledger (served on loopback, SQLite and PostgreSQL) and a real witness (its app
served on loopback, as in tests/test_witness.py): the witness's ``add-checkpoint`` answer
appended to the ledger's checkpoint is the cosigned checkpoint. A small proxy in front of
the ledger serves ``GET /journal/checkpoint`` with the cosignatures appended, as a ledger
that was never configured with witnesses could be fronted by someone else: ``ubc proof
get`` and ``ubc audit verify URL`` work unchanged. The ledger asking its own witnesses
(``UBC_WITNESSES``) is tests/test_witness_cosign.py.

The split view: one database grows, is cloned (SQLite backup / ``CREATE DATABASE ...
TEMPLATE``), and the two copies take different entries, served with the same data dir
(the same ledger key). Both branches' checkpoints verify under the ledger's vkey alone;
the witness cosigns one and refuses the other, and only the cosigned branch passes
``ubc audit verify --witness``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner

from tests.conftest import _admin_conninfo, make_data_dir, run_server, serve_asgi
from tests.test_witness import ORIGIN, Ledger, Served, run_witness, size_of
from ubc.cli import app
from ubc.journal.checkpoint import format_checkpoint, format_tlog_proof, parse_tlog_proof
from ubc.signing import NoteSigner, NoteVerifier, generate_signing_key
from ubc.witness.cosignature import Cosigner
from ubc.witness.quorum import WitnessPolicy

OTHER_WITNESS = "witness.test/w2"


def cli(*args: str) -> tuple[int, str, str]:
    """Exit code, stdout, and everything printed (stdout and stderr) on one line."""
    result = CliRunner().invoke(app, list(args), env={"UBC_TOKEN": None})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    # Rich boxes and tables wrap long messages: the box edges are dropped.
    return result.exit_code, result.stdout, " ".join(result.output.replace("\u2502", " ").split())


def verify(source: str, vkey: str, *options: str) -> tuple[int, dict[str, object], str]:
    code, stdout, output = cli("audit", "verify", source, "--vkey", vkey, "--json", *options)
    report = json.loads(stdout) if stdout.strip() else {}
    return code, report, output


def rules(report: dict[str, object]) -> set[str]:
    findings = report["findings"]
    assert isinstance(findings, list)
    return {f["rule"] for f in findings}


def statuses(report: dict[str, object]) -> dict[str, str]:
    witnesses = report["witnesses"]
    assert isinstance(witnesses, list)
    return {w["name"]: w["status"] for w in witnesses}


def forge(line: str) -> str:
    """The cosignature line with one bit of its Ed25519 signature flipped."""
    name, encoded = line.removeprefix("\u2014 ").removesuffix("\n").split(" ")
    raw = bytearray(base64.b64decode(encoded))
    raw[-1] ^= 1
    return f"\u2014 {name} {base64.b64encode(bytes(raw)).decode()}\n"


def other_vkey() -> str:
    """A second witness, trusted by the auditor, that never saw the checkpoint."""
    return Cosigner(OTHER_WITNESS, generate_signing_key()).vkey


# --- serving things on loopback ------------------------------------------------------------


def cosigning_proxy(upstream: str, cosignatures: list[str]) -> Starlette:
    """What item 1 will make the ledger do: ``GET /journal/checkpoint`` answers the
    checkpoint with the witnesses' cosignature lines appended; the rest is the ledger's."""

    async def forward(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        async with httpx.AsyncClient(base_url=upstream, timeout=30) as client:
            answer = await client.get(
                request.url.path, params=request.query_params, headers=headers
            )
        body = answer.content
        if request.url.path == "/journal/checkpoint" and answer.status_code == 200:
            body += "".join(cosignatures).encode()
        return Response(
            body, status_code=answer.status_code, media_type=answer.headers.get("content-type")
        )

    return Starlette(routes=[Route("/{path:path}", forward)])


@contextlib.contextmanager
def ledger_on(db_url: str, data_dir: Path) -> Iterator[Ledger]:
    with (
        run_server(db_url, data_dir) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield Ledger(server, client)


@contextlib.contextmanager
def witness_for(db_url: str, ledger: Ledger) -> Iterator[Served]:
    with run_witness(db_url, {ORIGIN: [NoteVerifier.from_vkey(ledger.vkey)]}) as served:
        yield served


def cosign(witness: Served, old: int, proof: list[bytes], note: str) -> str:
    """The note with the witness's cosignature appended (the witness must accept it)."""
    answer = witness.add(old, proof, note)
    assert answer.status_code == 200, answer.text
    assert answer.text.startswith("\u2014 " + witness.witness.cosigner.name + " ")
    return note + answer.text


# --- (a) a ledger and a witness ------------------------------------------------------------


def test_audit_verify_requires_the_witnesses(db_url: str, tmp_path: Path) -> None:
    with ledger_on(db_url, make_data_dir(tmp_path / "data")) as ledger:
        ledger.grow(2)
        vkey = ledger.vkey
        with witness_for(db_url, ledger) as witness:
            note = ledger.checkpoint()
            cosigned = cosign(witness, 0, [], note)
            wvkey = witness.vkey
        (tmp_path / "cosigned.txt").write_text(cosigned)
        export = tmp_path / "journal.jsonl"
        code, _, output = cli("audit", "export", db_url, "-o", str(export))
        assert code == 0, output
        with_cosigned = ("--cosigned-checkpoint", str(tmp_path / "cosigned.txt"))

        # Without witnesses: as before, no witness keys in the report.
        code, report, output = verify(str(export), vkey)
        assert code == 0, output
        assert "witnesses" not in report

        # The cosigned checkpoint, the witness required: passes, and says who cosigned.
        code, report, output = verify(str(export), vkey, *with_cosigned, "--witness", wvkey)
        assert code == 0, output
        assert report["quorum"] == 1
        [found] = report["witnesses"]  # type: ignore[misc]
        assert found["name"] == witness.witness.cosigner.name
        assert found["vkey"] == wvkey
        assert found["status"] == "cosigned"
        assert isinstance(found["timestamp"], int)
        assert report["checkpoint_size"] == size_of(note)
        code, _, output = cli(
            "audit", "verify", str(export), "--vkey", vkey, *with_cosigned, "--witness", wvkey
        )
        assert code == 0
        assert "OK" in output

        # The export's own checkpoint carries no cosignature: the requirement fails.
        code, report, output = verify(str(export), vkey, "--witness", wvkey)
        assert code == 1
        assert rules(report) == {"checkpoint.witnesses"}
        assert statuses(report) == {witness.witness.cosigner.name: "missing"}
        code, _, output = cli("audit", "verify", str(export), "--vkey", vkey, "--witness", wvkey)
        assert code == 1
        assert "checkpoint.witnesses" in output
        assert "0 of 1 witnesses cosigned" in output

        # An export whose checkpoint is the cosigned one (what exporting from a ledger that
        # serves cosigned checkpoints gives) passes without --cosigned-checkpoint.
        header, rest = export.read_text().split("\n", 1)
        exported = tmp_path / "cosigned.jsonl"
        exported.write_text(
            json.dumps({**json.loads(header), "checkpoint": cosigned}) + "\n" + rest
        )
        code, report, output = verify(str(exported), vkey, "--witness", wvkey)
        assert code == 0, output

        # --quorum: 1 ≤ K ≤ the number of witnesses given, else a usage error (exit 2).
        for bad in ("2", "0", "-1"):
            code, _, output = cli(
                "audit", "verify", str(export), "--vkey", vkey, "--witness", wvkey,
                "--quorum", bad,
            )  # fmt: skip
            assert code == 2, output
            assert "quorum must be between 1 and the number of witnesses given (1)" in output
        code, _, output = cli("audit", "verify", str(export), "--vkey", vkey, "--quorum", "1")
        assert code == 2
        assert "--quorum needs at least one --witness" in output
        for bad in ("nope", vkey, wvkey + "x"):  # malformed, a ledger (0x01) key, bad key
            code, _, output = cli("audit", "verify", str(export), "--vkey", vkey, "--witness", bad)
            assert code == 2, output
            assert "--witness" in output
        code, _, output = cli(
            "audit", "verify", str(export), "--vkey", vkey, "--witness", wvkey, "--witness", wvkey
        )
        assert code == 2
        assert "same key" in output

        # A second witness that did not cosign: all of them (the default) or 2 of 2 fail;
        # 1 of 2 passes and the report still names the missing one.
        second = other_vkey()
        both = ("--witness", wvkey, "--witness", second)
        for quorum in ((), ("--quorum", "2")):
            code, report, output = verify(str(export), vkey, *with_cosigned, *both, *quorum)
            assert code == 1
            assert rules(report) == {"checkpoint.witnesses"}
            assert report["quorum"] == 2
            assert statuses(report) == {
                witness.witness.cosigner.name: "cosigned",
                OTHER_WITNESS: "missing",
            }
            [finding] = report["findings"]  # type: ignore[misc]
            assert "1 of 2 witnesses cosigned" in finding["found"]
            assert f"missing: {OTHER_WITNESS} (no cosignature)" in finding["found"]
        code, report, output = verify(str(export), vkey, *with_cosigned, *both, "--quorum", "1")
        assert code == 0, output
        assert statuses(report)[OTHER_WITNESS] == "missing"

        # A forged cosignature line (the witness's name and key ID, a wrong signature).
        witness_line = cosigned.removeprefix(note)
        forged = tmp_path / "forged.txt"
        forged.write_text(note + forge(witness_line))
        code, report, output = verify(
            str(export), vkey, "--cosigned-checkpoint", str(forged), "--witness", wvkey
        )
        assert code == 1
        assert rules(report) == {"checkpoint.cosignature", "checkpoint.witnesses"}
        assert statuses(report) == {witness.witness.cosigner.name: "invalid"}
        # ... even next to the genuine one: a line of a trusted key that fails is refused.
        forged.write_text(cosigned + forge(witness_line))
        code, report, output = verify(
            str(export), vkey, "--cosigned-checkpoint", str(forged), *both, "--quorum", "1"
        )
        assert code == 1
        assert rules(report) == {"checkpoint.cosignature", "checkpoint.witnesses"}
        # The witness's line moved onto another checkpoint of the same ledger: invalid too.
        ledger.grow(1)
        moved = tmp_path / "moved.txt"
        moved.write_text(ledger.checkpoint() + witness_line)
        code, report, output = verify(
            db_url, vkey, "--cosigned-checkpoint", str(moved), "--witness", wvkey
        )
        assert code == 1
        assert rules(report) == {"checkpoint.cosignature", "checkpoint.witnesses"}
        # A cosigned checkpoint the ledger did not sign is a checkpoint finding as ever.
        unsigned = tmp_path / "unsigned.txt"
        unsigned.write_text(cosigned.replace(note.split("\n\n")[1], "", 1))
        code, report, _ = verify(
            str(export), vkey, "--cosigned-checkpoint", str(unsigned), "--witness", wvkey
        )
        assert code == 1
        assert "checkpoint.signature" in rules(report)


def test_receipts_carry_the_cosigned_checkpoint(db_url: str, tmp_path: Path) -> None:
    with ledger_on(db_url, make_data_dir(tmp_path / "data")) as ledger:
        ledger.grow(2)
        vkey, server = ledger.vkey, ledger.server
        with witness_for(db_url, ledger) as witness:
            note = ledger.checkpoint()
            cosigned = cosign(witness, 0, [], note)
            wvkey, wname = witness.vkey, witness.witness.cosigner.name
        lines = [cosigned.removeprefix(note)]
        with serve_asgi(cosigning_proxy(server.url, lines)) as proxy:
            assert httpx.get(f"{proxy}/journal/checkpoint").text == cosigned
            receipt = tmp_path / "r.tlog-proof"
            code, _, output = cli(
                "proof", "get", "3", "--server", proxy, "--token", server.auditor_token,
                "--vkey", vkey, "-o", str(receipt), "--witness", wvkey,
            )  # fmt: skip
            assert code == 0, output
            assert f"cosigned by {wname}" in output
            # The receipt keeps every signature line of the served checkpoint.
            assert parse_tlog_proof(receipt.read_text()).checkpoint == cosigned
            # proof get refuses to write a receipt that lacks the required cosignatures.
            code, _, output = cli(
                "proof", "get", "3", "--server", proxy, "--token", server.auditor_token,
                "--vkey", vkey, "-o", str(tmp_path / "no"), "--witness", wvkey,
                "--witness", other_vkey(),
            )  # fmt: skip
            assert code == 1
            assert "not witnessed" in output
            assert not (tmp_path / "no").exists()
            # audit verify of the server (what a ledger serving cosigned checkpoints gives).
            code, report, output = verify(
                proxy, vkey, "--token", server.auditor_token, "--witness", wvkey
            )
            assert code == 0, output
            assert statuses(report) == {wname: "cosigned"}

    # Offline: the receipt alone, the ledger's vkey and the witnesses' vkeys.
    code, _, output = cli("proof", "check", str(receipt), "--vkey", vkey)
    assert code == 0, output
    code, _, output = cli("proof", "check", str(receipt), "--vkey", vkey, "--witness", wvkey)
    assert code == 0, output
    assert "Entry 3 is included in the signed checkpoint, cosigned by" in output
    second = other_vkey()
    code, _, output = cli(
        "proof", "check", str(receipt), "--vkey", vkey, "--witness", wvkey, "--witness", second
    )
    assert code == 1
    assert "not witnessed" in output
    assert f"{OTHER_WITNESS} (no cosignature)" in output
    code, _, output = cli(
        "proof", "check", str(receipt), "--vkey", vkey,
        "--witness", wvkey, "--witness", second, "--quorum", "1",
    )  # fmt: skip
    assert code == 0, output
    code, _, output = cli(
        "proof", "check", str(receipt), "--vkey", vkey, "--witness", wvkey, "--quorum", "2"
    )
    assert code == 2
    assert "quorum must be between 1" in output
    # A receipt with a forged cosignature, or without any: refused.
    parsed = parse_tlog_proof(receipt.read_text())
    for checkpoint, why in ((note + forge(lines[0]), "does not verify"), (note, "missing")):
        bad = tmp_path / "bad.tlog-proof"
        bad.write_text(format_tlog_proof(parsed.index, parsed.proof, checkpoint, parsed.extra))
        code, _, output = cli("proof", "check", str(bad), "--vkey", vkey)
        assert code == 0, output  # the ledger's signature alone is fine
        code, _, output = cli("proof", "check", str(bad), "--vkey", vkey, "--witness", wvkey)
        assert code == 1
        assert why in output


# --- (b) a split view ----------------------------------------------------------------------


@contextlib.contextmanager
def cloned(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A copy of the database at ``db_url`` (no server may be writing to it)."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        copy = tmp_path / "branch-b.db"
        assert url.database is not None
        with sqlite3.connect(url.database) as source, sqlite3.connect(copy) as target:
            source.backup(target)
        yield f"sqlite:///{copy}"
        return
    name = url.database
    clone = f"{name}_b"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        # The stopped server's pool may still hold connections: a template must have none.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(f'CREATE DATABASE "{clone}" TEMPLATE "{name}"')
    try:
        yield url.set(database=clone).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{clone}" WITH (FORCE)')


def test_a_split_view_is_caught_by_the_witness(db_url: str, tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "data")
    with ledger_on(db_url, data) as ledger:
        ledger.grow(2)
        prefix = ledger.checkpoint()
    with (
        cloned(db_url, tmp_path) as branch_b_url,
        ledger_on(db_url, data) as branch_a,
        ledger_on(branch_b_url, data) as branch_b,
        witness_for(db_url, branch_a) as witness,
    ):
        vkey, wvkey = branch_a.vkey, witness.vkey
        assert branch_b.vkey == vkey  # the same ledger key serves both branches
        assert branch_a.checkpoint() == branch_b.checkpoint() == prefix
        # The witness saw the common prefix.
        cosign(witness, 0, [], prefix)
        old = size_of(prefix)
        # The branches diverge: different entries, the same number of them.
        branch_a.grow(1)
        branch_b.grow(1)
        note_a, note_b = branch_a.checkpoint(), branch_b.checkpoint()
        assert size_of(note_a) == size_of(note_b) > old
        assert note_a.split("\n")[2] != note_b.split("\n")[2]  # the roots differ
        for note in (note_a, note_b):
            NoteVerifier.from_vkey(vkey).verify(note)  # both signed by the ledger
        # The witness cosigns branch A (it extends the prefix) ...
        cosigned_a = cosign(witness, old, branch_a.proof(old, size_of(note_a)), note_a)
        # ... and refuses branch B: its proof from the prefix is fine, but the witness is
        # at A's size now (409 with its size); at that size, B's root is not A's (409).
        refused = witness.add(old, branch_b.proof(old, size_of(note_b)), note_b)
        assert refused.status_code == 409
        assert refused.text == f"{size_of(note_a)}\n"
        refused = witness.add(size_of(note_a), [], note_b)
        assert refused.status_code == 409
        assert refused.headers["content-type"].startswith("text/plain")
        # B grows past A: B's consistency proof from A's size cannot lead from A's root to
        # B's (422), whatever B sends.
        size_a = size_of(note_a)
        branch_b.grow(1)
        note_b = branch_b.checkpoint()
        refused = witness.add(size_a, branch_b.proof(size_a, size_of(note_b)), note_b)
        assert refused.status_code == 422, refused.text
        a_line = cosigned_a.removeprefix(note_a)

        files = {}
        for name, note in (
            ("a.txt", cosigned_a),
            ("b.txt", note_b),
            ("b-with-a-line.txt", note_b + a_line),  # a's cosignature pasted onto b
        ):
            files[name] = tmp_path / name
            files[name].write_text(note)

        # Without witnesses, each branch is a valid journal on its own: the split view.
        assert verify(db_url, vkey)[0] == 0
        assert verify(branch_b_url, vkey)[0] == 0
        # Requiring the witness: branch A passes, branch B fails, whatever it carries.
        code, report, output = verify(
            db_url, vkey, "--cosigned-checkpoint", str(files["a.txt"]), "--witness", wvkey
        )
        assert code == 0, output
        assert statuses(report) == {witness.witness.cosigner.name: "cosigned"}
        code, report, _ = verify(
            branch_b_url, vkey, "--cosigned-checkpoint", str(files["b.txt"]), "--witness", wvkey
        )
        assert code == 1
        assert rules(report) == {"checkpoint.witnesses"}
        assert statuses(report) == {witness.witness.cosigner.name: "missing"}
        code, report, _ = verify(
            branch_b_url,
            vkey,
            "--cosigned-checkpoint",
            str(files["b-with-a-line.txt"]),
            "--witness",
            wvkey,
        )
        assert code == 1
        assert rules(report) == {"checkpoint.cosignature", "checkpoint.witnesses"}
        assert statuses(report) == {witness.witness.cosigner.name: "invalid"}
        # And B's journal against A's cosigned checkpoint: the roots disagree.
        code, report, _ = verify(
            branch_b_url, vkey, "--cosigned-checkpoint", str(files["a.txt"]), "--witness", wvkey
        )
        assert code == 1
        assert "merkle.root" in rules(report)


def test_the_policy_counts_distinct_witnesses() -> None:
    one, two = (
        Cosigner("w.test/1", generate_signing_key()),
        Cosigner("w.test/2", generate_signing_key()),
    )
    policy = WitnessPolicy.from_vkeys([one.vkey, two.vkey], 1)
    body = format_checkpoint("example.com/log", 3, b"\x22" * 32)
    note = NoteSigner("example.com/log", generate_signing_key()).sign(body)
    # Two cosignatures by the same witness count once.
    twice = note + one.sign(body, 10) + one.sign(body, 20)
    verdict = WitnessPolicy.from_vkeys([one.vkey, two.vkey]).check(twice)
    assert not verdict.ok
    assert [r.status for r in verdict.results] == ["cosigned", "missing"]
    assert verdict.results[0].timestamp == 20
    assert policy.check(twice).ok
    assert WitnessPolicy.from_vkeys([one.vkey, two.vkey]).check(twice + two.sign(body, 30)).ok
    # One key under two names is one witness.
    alias = Cosigner("w.test/alias", one._key)  # noqa: SLF001 - the same key on purpose
    with pytest.raises(ValueError, match="same key"):
        WitnessPolicy.from_vkeys([one.vkey, alias.vkey])
    # A malformed note: every witness's verdict is invalid.
    verdict = policy.check("not a note")
    assert [r.status for r in verdict.results] == ["invalid", "invalid"]
