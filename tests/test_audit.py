"""The offline auditor against a real ledger: export, verify, tampering, restore.

One ledger per engine is built through a live server (members registered and admitted,
deposits, transfers, a key rotation, an API-key grant, a batch) and exported; each test
then tampers with a copy of its database or of its export and checks that the verifier
names the right entry and rule.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import itertools
import json
import os
import shutil
import sqlite3
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from nacl.signing import SigningKey
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from tests.conftest import POSTGRES_URL, _admin_conninfo, make_data_dir, run_server
from ubc.audit import source
from ubc.audit import verify as verify_module
from ubc.audit.memory import MemoryState
from ubc.audit.source import from_export, open_source
from ubc.audit.verify import (
    Finding,
    Replayed,
    Report,
    VerifyError,
    compare_balances,
    compare_with_database,
    live_balances_from_database,
    verify_journal,
)
from ubc.cli import app
from ubc.db import make_engine
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import sign_payload
from ubc.journal.checkpoint import format_checkpoint, parse_checkpoint
from ubc.journal.merkle import append_leaves, leaf_hash, root_from_frontier
from ubc.signing import (
    NoteSigner,
    canonical_json,
    encode_public_key,
    generate_signing_key,
    load_signing_key,
    sign_envelope,
)

ORIGIN = "test.ubc/ledger"
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
_names = itertools.count()


# --- envelopes -------------------------------------------------------------------------


def now() -> str:
    return format_timestamp(datetime.now(UTC))


def envelope(type_: str, keys: list[SigningKey], **fields: Any) -> dict[str, Any]:
    """A signed envelope of ``type_``; ``fields`` go into the payload (``from_`` → ``from``)."""
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    body = {"ledger": ORIGIN, "id": str(uuid.uuid4()), "created_at": now(), **fields}
    return sign_payload(validate_payload(type_, body), type_, keys).to_json()


def public(key: SigningKey) -> str:
    return encode_public_key(bytes(key.verify_key))


class Submitter:
    """Posts envelopes to a live server and remembers the seq of each labelled one."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.seqs: dict[str, int] = {}
        self.ids: dict[str, str] = {}

    def post(self, label: str, env: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/api/envelopes", json=env)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        self.seqs[label] = body["seq"]
        self.ids[label] = body["id"]
        return body

    def batch(self, labelled: list[tuple[str, dict[str, Any]]]) -> None:
        response = self.client.post(
            "/api/envelopes/batch",
            json={"atomic": True, "envelopes": [e for _, e in labelled]},
        )
        assert response.status_code == 200, response.text
        for (label, _), result in zip(labelled, response.json()["results"], strict=True):
            assert result["status"] == 201, result
            self.seqs[label] = result["body"]["seq"]
            self.ids[label] = result["body"]["id"]


# --- databases -------------------------------------------------------------------------


class Databases:
    """Fresh migrated databases of either engine, and copies of one; dropped at the end."""

    def __init__(self, request: pytest.FixtureRequest, root: Path) -> None:
        self.request = request
        self.root = root
        self.dropped: list[str] = []

    def new(self, engine: str) -> str:
        if engine == "sqlite":
            template: Path = self.request.getfixturevalue("sqlite_template")
            path = self.root / f"db{next(_names)}.db"
            shutil.copyfile(template, path)
            return f"sqlite:///{path}"
        return self._postgres(self.request.getfixturevalue("postgres_template"))

    def copy(self, url: str) -> str:
        """A copy of ``url``; on PostgreSQL nothing may be connected to it."""
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = self.root / f"db{next(_names)}.db"
            shutil.copyfile(str(parsed.database), path)
            return f"sqlite:///{path}"
        return self._postgres(str(parsed.database))

    def _postgres(self, template: str) -> str:
        name = f"ubc_audit_{os.getpid()}_{next(_names)}"
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self.dropped.append(name)
        return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        if not self.dropped:
            return
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            for name in self.dropped:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def execute(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement straight on the database, past ubc: how an intruder tampers."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        con = sqlite3.connect(str(parsed.database))
        try:
            rows = con.execute(sql, params).fetchall()
            con.commit()
        finally:
            con.close()
        return rows
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cursor = conn.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


# --- exports ---------------------------------------------------------------------------


@dataclass
class Export:
    """An export file's header and entries, to edit and write back."""

    header: dict[str, Any]
    entries: list[tuple[int, bytes]]

    @classmethod
    def read(cls, path: Path) -> Export:
        lines = path.read_text(encoding="utf-8").splitlines()
        items = [json.loads(line) for line in lines[1:]]
        return cls(json.loads(lines[0]), [(i["seq"], base64.b64decode(i["entry"])) for i in items])

    def write(self, path: Path) -> Path:
        lines = [json.dumps(self.header)]
        lines += [
            json.dumps({"seq": s, "entry": base64.b64encode(e).decode()}) for s, e in self.entries
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def body(self, seq: int) -> dict[str, Any]:
        [entry] = [e for s, e in self.entries if s == seq]
        parsed: dict[str, Any] = json.loads(entry)
        return parsed

    def replace(self, seq: int, body: dict[str, Any]) -> None:
        self.entries = [(s, canonical_json(body) if s == seq else e) for s, e in self.entries]

    def resign(self, signer: NoteSigner) -> None:
        """A checkpoint over the entries as they are now, signed by ``signer``."""
        frontier: list[bytes] = []
        for position, (_, entry) in enumerate(self.entries):
            _, frontier = append_leaves(position, frontier, [leaf_hash(entry)])
        size = len(self.entries)
        text = format_checkpoint(ORIGIN, size, root_from_frontier(size, frontier))
        self.header["checkpoint"] = signer.sign(text)
        self.header["size"] = size


def payload_of(body: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(base64.b64decode(body["envelope"]["payload"]))
    return parsed


def with_payload(body: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """``body`` whose envelope carries ``payload`` under the original signatures."""
    envelope_json = dict(body["envelope"])
    envelope_json["payload"] = base64.b64encode(canonical_json(payload)).decode()
    return {**body, "envelope": envelope_json}


# --- the ledger ------------------------------------------------------------------------


@dataclass
class Built:
    """A ledger built through a live server, now stopped, and what the tests need of it."""

    engine: str
    db_url: str  # the live database (tests read it; copies come from ``pristine``)
    pristine: str  # an untouched copy nothing connects to, to copy from
    data_dir: Path
    vkey: str
    export: Path
    checkpoint: str
    early_checkpoint: str
    size: int
    seqs: dict[str, int]
    ids: dict[str, str]
    keys: dict[str, SigningKey]
    balances: dict[tuple[str, str], int]
    server_export: Path
    tokenless: Result  # `ubc audit export <server>` without a token
    tokenless_verify: Result  # `ubc audit verify <server>` without a token
    databases: Databases = field(repr=False)

    def copy(self) -> str:
        return self.databases.copy(self.pristine)


def built_ledger_key(built: Built) -> SigningKey:
    return load_signing_key(built.data_dir / "ledger.key")


def other_engine(engine: str) -> str:
    return "postgresql" if engine == "sqlite" else "sqlite"


def build_ledger(submit: Submitter, operator: SigningKey) -> dict[str, SigningKey]:
    keys = {h: generate_signing_key() for h in ("alice", "bob", "carol")}
    for handle, key in keys.items():
        submit.post(
            f"register {handle}",
            envelope(
                "member.register",
                [key],
                actor=f"member:{handle}",
                handle=handle,
                public_key=public(key),
            ),
        )
        submit.post(
            f"admit {handle}",
            envelope("member.admit", [operator], actor="operator", handle=handle, tier="basic"),
        )
    for handle, amount in (("alice", 1000), ("bob", 500), ("carol", 300)):
        submit.post(
            f"deposit {handle}",
            envelope(
                "deposit",
                [operator],
                actor="operator",
                to=f"member:{handle}",
                asset="CU",
                amount=amount,
                external_ref=f"bank-{handle}",
            ),
        )
    secret = "ubc_test_" + uuid.uuid4().hex
    submit.post(
        "grant bob",
        envelope(
            "apikey.grant",
            [keys["bob"]],
            actor="member:bob",
            account="member:bob",
            key_hash=hashlib.sha256(secret.encode()).hexdigest(),
            label="reader",
            scopes=["read"],
        ),
    )
    moves = [
        ("alice", "bob", 100),
        ("bob", "carol", 40),
        ("carol", "alice", 25),
        ("alice", "carol", 60),
        ("bob", "alice", 15),
    ]
    for i, (src, dst, amount) in enumerate(moves):
        submit.post(f"transfer {i}", transfer(keys[src], src, dst, amount, memo=f"t{i}"))
    return keys


def transfer(key: SigningKey, src: str, dst: str, amount: int, **extra: Any) -> dict[str, Any]:
    return envelope(
        "transfer",
        [key],
        actor=f"member:{src}",
        from_=f"member:{src}",
        to=f"member:{dst}",
        asset="CU",
        amount=amount,
        **extra,
    )


def build_more(submit: Submitter, keys: dict[str, SigningKey]) -> None:
    new_alice = generate_signing_key()
    submit.post(
        "rotate alice",
        envelope(
            "key.rotate",
            [keys["alice"], new_alice],
            actor="member:alice",
            handle="alice",
            new_public_key=public(new_alice),
        ),
    )
    keys["old alice"], keys["alice"] = keys["alice"], new_alice
    submit.post("transfer 5", transfer(keys["alice"], "alice", "bob", 33))
    submit.post("transfer 6", transfer(keys["carol"], "carol", "bob", 7))
    submit.batch(
        [
            ("batch 0", transfer(keys["alice"], "alice", "carol", 11)),
            ("batch 1", transfer(keys["bob"], "bob", "carol", 12)),
            ("batch 2", transfer(keys["carol"], "carol", "alice", 13)),
            ("batch 3", transfer(keys["alice"], "alice", "bob", 14)),
        ]
    )


@pytest.fixture(scope="module", params=ENGINES)
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Built]:
    engine: str = request.param
    root = tmp_path_factory.mktemp(f"audit-{engine}")
    databases = Databases(request, root)
    try:
        db_url = databases.new(engine)
        data_dir = make_data_dir(root / "data")
        runner = CliRunner()
        with run_server(db_url, data_dir) as server, httpx.Client(base_url=server.url) as client:
            vkey = client.get("/api/ledger").json()["vkey"]
            submit = Submitter(client)
            keys = build_ledger(submit, server.operator_key)
            early = client.get("/journal/checkpoint").text
            build_more(submit, keys)
            checkpoint = client.get("/journal/checkpoint").text
            server_export = root / "server.jsonl"
            result = runner.invoke(
                app,
                ["audit", "export", server.url, "-o", str(server_export)]
                + ["--token", server.auditor_token],
            )
            assert result.exit_code == 0, result.output
            tokenless = runner.invoke(
                app,
                ["audit", "export", server.url, "-o", str(root / "tokenless.jsonl")],
                env={"UBC_TOKEN": None},
            )
            tokenless_verify = runner.invoke(
                app,
                ["audit", "verify", server.url, "--vkey", vkey],
                env={"UBC_TOKEN": None},
            )
        pristine = databases.copy(db_url)
        export = root / "export.jsonl"
        result = runner.invoke(app, ["audit", "export", db_url, "-o", str(export)])
        assert result.exit_code == 0, result.output
        yield Built(
            engine=engine,
            db_url=db_url,
            pristine=pristine,
            data_dir=data_dir,
            vkey=vkey,
            export=export,
            checkpoint=checkpoint,
            early_checkpoint=early,
            size=parse_checkpoint(checkpoint.split("\n\n")[0] + "\n").size,
            seqs=submit.seqs,
            ids=submit.ids,
            keys=keys,
            balances=live_balances_from_database(db_url),
            server_export=server_export,
            tokenless=tokenless,
            tokenless_verify=tokenless_verify,
            databases=databases,
        )
    finally:
        databases.close()


@pytest.fixture(autouse=True, params=verify_module.ENGINES)
def verify_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test once with the in-memory re-run (``ubc audit verify``'s) and once with the
    write path into a scratch database: the same findings from both."""
    engine: str = request.param
    monkeypatch.setattr(verify_module, "DEFAULT_ENGINE", engine)
    return engine


def verify(source: str | Path, built: Built, *, old: str | None = None) -> Report:
    return verify_journal(open_source(str(source)), built.vkey, old_checkpoint=old)


def rules_at(report: Report) -> set[tuple[int | None, str]]:
    return {(f.seq, f.rule) for f in report.findings}


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.output


# --- a clean ledger ------------------------------------------------------------------------


def test_the_ledger_has_what_the_tests_expect(built: Built) -> None:
    assert built.size == 1 + 6 + 3 + 1 + 5 + 1 + 2 + 4
    assert sorted(built.seqs.values()) == list(range(1, built.size))
    assert built.balances[("member:alice", "CU")] == 1000 - 100 + 25 - 60 + 15 - 33 - 11 + 13 - 14
    assert sum(v for (_, asset), v in built.balances.items() if asset == "CU") == 0


def test_exports_from_the_database_and_the_server_are_identical(built: Built) -> None:
    assert built.export.read_text() == built.server_export.read_text()
    journal = from_export(built.export)
    assert journal.checkpoint == built.checkpoint
    assert [s for s, _ in journal.entries] == list(range(built.size))


def test_exporting_from_a_server_without_the_auditor_token(built: Built) -> None:
    # Without the auditor's token the server shows no entry contents: no export, and no
    # verification of the server either; a clear error, not a traceback.
    for result in (built.tokenless, built.tokenless_verify):
        assert result.exit_code == 1, result.output
        assert not isinstance(result.exception, Exception), result.exception
        assert "auditor token" in " ".join(result.output.split())


def test_a_malformed_vkey_is_a_clear_error(built: Built, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", str(built.export), "--vkey", "nope"])
    assert result.exit_code == 1
    assert not isinstance(result.exception, Exception), result.exception
    assert "not a valid vkey" in " ".join(result.output.split())
    # verify_journal refuses it before reading anything of the journal.
    read: list[int] = []

    def entries() -> Iterator[tuple[int, bytes]]:
        read.append(1)
        yield from from_export(built.export).entries

    journal = source.Journal(built.checkpoint, built.size, entries())
    with pytest.raises(VerifyError, match="not a valid vkey"):
        verify_journal(journal, "nope")
    assert read == []
    # `ubc restore` with a malformed vkey is the same clear error.
    target = built.databases.new(built.engine)
    args = ["restore", str(built.export), "--into", target, "--vkey", "nope"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert not isinstance(result.exception, Exception), result.exception
    assert "not a valid vkey" in " ".join(result.output.split())


def test_a_clean_ledger_verifies(built: Built, tmp_path: Path) -> None:
    code, _, output = cli(
        "audit", "verify", str(built.export), "--vkey", built.vkey, "--against", built.db_url
    )
    assert code == 0, output
    assert "OK" in output
    assert f"{built.size} entries verified" in output
    # The database itself is a source too, with an earlier checkpoint kept by the auditor.
    early = tmp_path / "early.checkpoint"
    early.write_text(built.early_checkpoint)
    code, _, output = cli(
        "audit", "verify", built.db_url, "--vkey", built.vkey, "--checkpoint", str(early)
    )
    assert code == 0, output


def test_the_json_report(built: Built) -> None:
    code, stdout, output = cli(
        "audit",
        "verify",
        str(built.export),
        "--vkey",
        built.vkey,
        "--json",
        "--against",
        built.db_url,
    )
    assert code == 0, output
    report = json.loads(stdout)
    root = parse_checkpoint(built.checkpoint.split("\n\n")[0] + "\n").root
    assert report == {
        "ok": True,
        "entries": built.size,
        "checkpoint_size": built.size,
        "root": base64.b64encode(root).decode(),
        "findings": [],
    }


def test_the_json_report_lists_findings(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    export.entries.pop()
    code, stdout, _ = cli(
        "audit", "verify", str(export.write(tmp_path / "x.jsonl")), "--vkey", built.vkey, "--json"
    )
    assert code == 1
    report = json.loads(stdout)
    assert report["ok"] is False
    assert report["entries"] == built.size - 1
    assert report["checkpoint_size"] == built.size
    assert {"seq": built.size - 1, "rule": "journal.missing"}.items() <= report["findings"][
        0
    ].items()
    for finding in report["findings"]:
        assert set(finding) == {"seq", "rule", "expected", "found"}


def test_the_wrong_vkey_is_a_finding(built: Built) -> None:
    other = NoteSigner(ORIGIN, generate_signing_key()).vkey
    report = verify_journal(from_export(built.export), other)
    assert (None, "checkpoint.signature") in rules_at(report)
    assert (0, "genesis.signature") in rules_at(report)


def test_an_unread_export_closes_its_file(built: Built) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        journal = from_export(built.export)
        del journal
        # Read in part, then dropped: the file closes with the entry stream.
        partly = from_export(built.export)
        assert next(partly.entries)[0] == 0
        del partly
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_database_source_disposes_its_engines(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Engine] = []
    disposed: set[int] = set()

    def recording_make_engine(*args: Any, **kwargs: Any) -> Engine:
        engine = make_engine(*args, **kwargs)
        made.append(engine)
        original = engine.dispose

        def dispose(close: bool = True) -> None:
            disposed.add(id(engine))
            original(close)

        monkeypatch.setattr(engine, "dispose", dispose)
        return engine

    monkeypatch.setattr(source, "make_engine", recording_make_engine)
    journal = source.from_database(built.db_url)
    assert len(list(journal.entries)) == built.size
    assert len(made) == 2
    assert [id(e) in disposed for e in made] == [True, True]


# --- tampering with the database -------------------------------------------------------------


def test_a_balance_edited_in_the_database(built: Built) -> None:
    copy = built.copy()
    execute(
        copy,
        "UPDATE accounts SET credits_posted = credits_posted + 7 "
        "WHERE address = 'member:bob' AND asset = 'CU'",
    )
    report = verify_journal(open_source(copy), built.vkey)
    assert report.ok, report.findings  # the journal itself is intact
    bob = built.balances[("member:bob", "CU")]
    expected = [Finding(None, "balance.against", f"member:bob CU posted {bob}", f"live {bob + 7}")]
    report = verify_journal(
        open_source(copy),
        built.vkey,
        against=lambda url: compare_balances(url, live_balances_from_database(copy)),
    )
    assert report.findings == expected
    # Transfers and postings are untouched: the full comparison finds only the balance.
    report = verify_journal(
        open_source(copy), built.vkey, against=lambda url: compare_with_database(url, copy)
    )
    assert report.findings == expected
    code, stdout, _ = cli(
        "audit", "verify", copy, "--vkey", built.vkey, "--against", copy, "--json"
    )
    assert code == 1
    [finding] = json.loads(stdout)["findings"]
    assert finding["rule"] == "balance.against"
    assert "member:bob CU" in finding["expected"]


def test_a_posting_amount_edited_in_the_database(built: Built) -> None:
    copy = built.copy()
    transfer_id = f"{built.ids['transfer 1']}:0"
    execute(copy, "UPDATE postings SET posted = posted + 5 WHERE transfer_id = ?", (transfer_id,))
    execute(copy, "UPDATE transfers SET amount = amount + 5 WHERE id = ?", (transfer_id,))
    report = verify_journal(
        open_source(copy), built.vkey, against=lambda url: compare_with_database(url, copy)
    )
    seq = built.seqs["transfer 1"]
    assert any(f.seq == seq or transfer_id in f.expected + f.found for f in report.findings), (
        report.findings
    )
    # The accounts are untouched: the transfer and its postings are named, at its entry.
    assert rules_at(report) == {(seq, "transfer.against"), (seq, "posting.against")}
    assert all(transfer_id in f.expected for f in report.findings), report.findings
    code, stdout, _ = cli(
        "audit", "verify", copy, "--vkey", built.vkey, "--against", copy, "--json"
    )
    assert code == 1
    findings = json.loads(stdout)["findings"]
    assert {(f["seq"], f["rule"]) for f in findings} == rules_at(report)


def test_an_entrys_effects_edited_in_the_database(built: Built) -> None:
    copy = built.copy()
    seq = built.seqs["transfer 2"]
    [(raw,)] = execute(copy, "SELECT entry FROM journal_entries WHERE seq = ?", (seq,))
    body = json.loads(bytes(raw))
    body["effects"][0]["amount"] += 1000
    execute(copy, "UPDATE journal_entries SET entry = ? WHERE seq = ?", (canonical_json(body), seq))
    report = verify(copy, built)
    assert rules_at(report) == {(seq, "effects.transfer"), (built.size - 1, "merkle.root")}


def test_an_entry_deleted_from_the_database(built: Built) -> None:
    copy = built.copy()
    seq = built.seqs["transfer 4"]
    execute(copy, "DELETE FROM journal_entries WHERE seq = ?", (seq,))
    report = verify(copy, built)
    assert (seq, "journal.sequence") in rules_at(report)
    assert (built.size - 1, "journal.missing") in rules_at(report)


# --- tampering with the export ---------------------------------------------------------------


def test_an_amount_edited_inside_the_signed_payload(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    seq = built.seqs["transfer 0"]
    body = export.body(seq)
    payload = payload_of(body)
    payload["amount"] += 1
    body["effects"][0]["amount"] += 1  # consistent effects: only the signature can tell
    export.replace(seq, with_payload(body, payload))
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert (seq, "envelope.transfer") in rules_at(report)
    [finding] = [f for f in report.findings if f.seq == seq]
    assert finding.found.startswith("401 unauthenticated"), finding
    assert (built.size - 1, "merkle.root") in rules_at(report)


def test_an_amount_edited_inside_the_effects(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    seq = built.seqs["batch 2"]
    body = export.body(seq)
    body["effects"][0]["amount"] = 1
    export.replace(seq, body)
    export.resign(NoteSigner(ORIGIN, built_ledger_key(built)))  # even under a good checkpoint
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert rules_at(report) == {(seq, "effects.transfer")}


def test_an_entry_removed_from_the_export(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    seq = built.seqs["transfer 3"]
    export.entries = [(s, e) for s, e in export.entries if s != seq]
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert (seq, "journal.sequence") in rules_at(report)
    assert min(f.seq for f in report.findings if f.seq is not None) == seq
    code, _, _ = cli("audit", "verify", str(tmp_path / "x.jsonl"), "--vkey", built.vkey)
    assert code == 1


def test_two_entries_swapped(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    first, second = built.seqs["transfer 0"], built.seqs["transfer 3"]
    by_seq = dict(export.entries)
    by_seq[first], by_seq[second] = by_seq[second], by_seq[first]
    export.entries = sorted(by_seq.items())  # labels in order, contents swapped
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert {(first, "journal.sequence"), (second, "journal.sequence")} <= rules_at(report)
    # Swapping the export lines themselves (labels travel with the entries) is caught too.
    export = Export.read(built.export)
    i, j = (
        export.entries.index((first, by_seq[second])),
        export.entries.index((second, by_seq[first])),
    )
    export.entries[i], export.entries[j] = export.entries[j], export.entries[i]
    report = verify(export.write(tmp_path / "y.jsonl"), built)
    assert {(first, "journal.sequence"), (second, "journal.sequence")} <= rules_at(report)


def test_a_signature_replaced_by_another_keys(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    seq = built.seqs["transfer 1"]
    body = export.body(seq)
    payload = base64.b64decode(body["envelope"]["payload"])
    forged = sign_envelope(body["envelope"]["payloadType"], payload, [generate_signing_key()])
    export.replace(seq, {**body, "envelope": forged.to_json()})
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert rules_at(report) == {(seq, "envelope.transfer"), (built.size - 1, "merkle.root")}
    [finding] = [f for f in report.findings if f.seq == seq]
    assert finding.found.startswith("401"), finding


def test_a_signature_of_another_member_or_a_rotated_key(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    ledger = NoteSigner(ORIGIN, built_ledger_key(built))
    # bob's transfer signed by carol (known key, not bob's): 403 at that seq.
    bobs = built.seqs["transfer 1"]
    body = export.body(bobs)
    payload = base64.b64decode(body["envelope"]["payload"])
    forged = sign_envelope(body["envelope"]["payloadType"], payload, [built.keys["carol"]])
    export.replace(bobs, {**body, "envelope": forged.to_json()})
    # alice's transfer after her rotation signed by her old key: 403 at that seq.
    alices = built.seqs["transfer 5"]
    body = export.body(alices)
    payload = base64.b64decode(body["envelope"]["payload"])
    forged = sign_envelope(body["envelope"]["payloadType"], payload, [built.keys["old alice"]])
    export.replace(alices, {**body, "envelope": forged.to_json()})
    export.resign(ledger)
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert rules_at(report) == {(bobs, "envelope.transfer"), (alices, "envelope.transfer")}
    assert all(f.found.startswith("403") for f in report.findings), report.findings


def test_a_forged_entry_appended_without_a_checkpoint(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    last = export.body(built.size - 1)
    env = transfer(built.keys["bob"], "bob", "carol", 1)
    envelope_id = json.loads(base64.b64decode(env["payload"]))["id"]
    effect = {
        "transfer_id": f"{envelope_id}:0",
        "kind": "transfer",
        "debit": "member:bob",
        "credit": "member:carol",
        "asset": "CU",
        "amount": 1,
        "phase": "posted",
    }
    entry = {
        "seq": built.size,
        "committed_at": last["committed_at"],
        "envelope": env,
        "effects": [effect],
    }
    export.entries.append((built.size, canonical_json(entry)))
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    # A valid envelope with the right effects: only the missing checkpoint gives it away.
    assert rules_at(report) == {(built.size, "journal.unsigned")}


def test_a_checkpoint_signed_by_another_key(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    export.resign(NoteSigner(ORIGIN, generate_signing_key()))
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert rules_at(report) == {(None, "checkpoint.signature")}
    # Under another origin, signed by the right key, the note still does not verify.
    export.header["checkpoint"] = NoteSigner("evil.example/ledger", built_ledger_key(built)).sign(
        format_checkpoint("evil.example/ledger", 1, b"\0" * 32)
    )
    report = verify(export.write(tmp_path / "y.jsonl"), built)
    assert (None, "checkpoint.signature") in rules_at(report)


def test_an_entry_repeated_under_a_resigned_checkpoint(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    seq = built.seqs["batch 1"]
    body = export.body(seq)
    assert export.body(seq + 1)["committed_at"] == body["committed_at"]
    entries = [(s, e) for s, e in export.entries if s <= seq]
    entries.append((seq + 1, canonical_json({**body, "seq": seq + 1})))
    for s, e in export.entries[seq + 1 :]:
        entries.append((s + 1, canonical_json({**json.loads(e), "seq": s + 1})))
    export.entries = entries
    export.resign(NoteSigner(ORIGIN, built_ledger_key(built)))
    report = verify(export.write(tmp_path / "x.jsonl"), built)
    assert rules_at(report) == {(seq + 1, "journal.duplicate")}, report.findings
    # `ubc restore` refuses it with the finding, not a crash on journal_entries' unique
    # envelope_id (IntegrityError), on either engine.
    for engine in (built.engine, other_engine(built.engine)):
        target = built.databases.new(engine)
        args = ["restore", str(tmp_path / "x.jsonl"), "--into", target, "--vkey", built.vkey]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
        output = " ".join(result.output.split())
        assert "journal.duplicate" in output
        assert "do not serve" in output


def test_a_history_rewritten_and_resigned_with_the_ledger_key(built: Built, tmp_path: Path) -> None:
    """The operator truncates the journal before the auditor's checkpoint, restores it,
    serves it with the real keys and lets it grow past the old size: every entry and the
    new checkpoint verify; only the checkpoint the auditor kept reveals the fork."""
    early_size = parse_checkpoint(built.early_checkpoint.split("\n\n")[0] + "\n").size
    keep = early_size - 3
    export = Export.read(built.export)
    export.entries = export.entries[:keep]
    export.resign(NoteSigner(ORIGIN, built_ledger_key(built)))
    truncated = export.write(tmp_path / "truncated.jsonl")
    forked = built.databases.new(built.engine)
    code, _, output = cli("restore", str(truncated), "--into", forked, "--vkey", built.vkey)
    assert code == 0, output
    with run_server(forked, built.data_dir) as server, httpx.Client(base_url=server.url) as c:
        submit = Submitter(c)
        for i in range(6):
            submit.post(
                f"rewrite {i}",
                envelope(
                    "deposit",
                    [server.operator_key],
                    actor="operator",
                    to="member:carol",
                    asset="CU",
                    amount=1000 + i,
                    external_ref=f"rewrite-{i}",
                ),
            )
    rewritten = tmp_path / "rewritten.jsonl"
    code, _, output = cli("audit", "export", forked, "-o", str(rewritten))
    assert code == 0, output
    assert verify(rewritten, built).ok  # the forged history is consistent in itself
    report = verify(rewritten, built, old=built.early_checkpoint)
    assert rules_at(report) == {(early_size - 1, "merkle.consistency")}
    old = tmp_path / "early.checkpoint"
    old.write_text(built.early_checkpoint)
    code, _, output = cli(
        "audit", "verify", str(rewritten), "--vkey", built.vkey, "--checkpoint", str(old)
    )
    assert code == 1
    assert "merkle.consistency" in output
    # The latest real checkpoint is larger than the fork: the log shrank.
    report = verify(rewritten, built, old=built.checkpoint)
    assert (None, "merkle.consistency") in rules_at(report)


def test_an_old_checkpoint_beyond_the_journal(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    export.entries = export.entries[:-2]
    export.resign(NoteSigner(ORIGIN, built_ledger_key(built)))
    report = verify(export.write(tmp_path / "x.jsonl"), built, old=built.checkpoint)
    assert (None, "merkle.consistency") in rules_at(report)


# --- restore -------------------------------------------------------------------------------


def test_restore_into_the_other_engine_and_serve_it(built: Built, tmp_path: Path) -> None:
    target = built.databases.new(other_engine(built.engine))
    code, _, output = cli("restore", str(built.export), "--into", target, "--vkey", built.vkey)
    assert code == 0, output
    assert live_balances_from_database(target) == built.balances
    code, _, output = cli(
        "audit", "verify", target, "--vkey", built.vkey, "--against", built.db_url
    )
    assert code == 0, output
    code, _, output = cli(
        "audit", "verify", str(built.export), "--vkey", built.vkey, "--against", target
    )
    assert code == 0, output
    # A restore needs an empty database.
    code, _, output = cli("restore", str(built.export), "--into", target, "--vkey", built.vkey)
    assert code == 1
    assert "already holds a journal" in " ".join(output.split())
    # The restored database serves the same ledger, and the ledger goes on.
    with run_server(target, built.data_dir) as server, httpx.Client(base_url=server.url) as c:
        headers = {"Authorization": f"Bearer {server.auditor_token}"}
        accounts = c.get("/api/accounts", headers=headers).json()["accounts"]
        assert {(a["address"], a["asset"]): a["posted"] for a in accounts} == built.balances
        assert c.get("/journal/checkpoint").text == built.checkpoint
        answer = Submitter(c).post("after", transfer(built.keys["alice"], "alice", "bob", 1))
        assert answer["seq"] == built.size
        # The old key stays rotated away and the API key still reads.
        old = c.post("/api/envelopes", json=transfer(built.keys["old alice"], "alice", "bob", 1))
        assert old.status_code == 403, old.text
        grew = c.get("/journal/checkpoint").text
        consistency = c.get(
            "/journal/proof/consistency", params={"old": built.size, "new": built.size + 1}
        )
        assert consistency.status_code == 200
    after = tmp_path / "before.checkpoint"
    after.write_text(built.checkpoint)
    code, _, output = cli(
        "audit", "verify", target, "--vkey", built.vkey, "--checkpoint", str(after)
    )
    assert code == 0, output
    assert parse_checkpoint(grew.split("\n\n")[0] + "\n").size == built.size + 1


def test_restore_of_a_tampered_export_fails(built: Built, tmp_path: Path) -> None:
    export = Export.read(built.export)
    seq = built.seqs["transfer 2"]
    body = export.body(seq)
    body["effects"][0]["amount"] += 1
    export.replace(seq, body)
    target = built.databases.new(built.engine)
    code, _, output = cli(
        "restore", str(export.write(tmp_path / "x.jsonl")), "--into", target, "--vkey", built.vkey
    )
    assert code == 1
    assert "effects.transfer" in output
    assert "do not serve" in output


# --- the in-memory re-run ----------------------------------------------------------------


def test_verify_creates_no_database(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify_engine: str
) -> None:
    if verify_engine != "memory":
        pytest.skip("the scratch-database engine makes one by design")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)

    def no_database(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"verify opened a database: {args}")

    monkeypatch.setattr(verify_module, "make_engine", no_database)
    monkeypatch.setattr(verify_module, "upgrade", no_database)
    monkeypatch.chdir(scratch)
    code, _, output = cli("audit", "verify", str(built.export), "--vkey", built.vkey)
    assert code == 0, output
    assert f"{built.size} entries verified" in output
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_in_memory_replay_and_a_restore_agree(
    built: Built, tmp_path: Path, seed: int, verify_engine: str
) -> None:
    """For prefixes of the journal (each under a checkpoint of its size), the balances,
    transfers and postings of the in-memory re-run are those ``ubc restore`` writes."""
    if verify_engine != "memory":
        pytest.skip("compares the in-memory engine with restore")
    import random

    size = random.Random(seed).randint(2, built.size)
    export = Export.read(built.export)
    export.entries = export.entries[:size]
    export.resign(NoteSigner(ORIGIN, built_ledger_key(built)))
    path = export.write(tmp_path / "prefix.jsonl")
    target = built.databases.new(built.engine)
    code, _, output = cli("restore", str(path), "--into", target, "--vkey", built.vkey)
    assert code == 0, output
    kept: list[Replayed] = []

    def keep(replayed: Replayed) -> list[Finding]:
        kept.append(replayed)
        return compare_with_database(replayed, target)

    report = verify_journal(from_export(path), built.vkey, against=keep)
    assert report.ok, report.findings
    [state] = kept
    assert isinstance(state, MemoryState)
    assert state.balances() == live_balances_from_database(target)
    rows = verify_module._ledger_rows(target)
    assert state.transfers == rows["transfer"]
    assert state.postings == rows["posting"]
