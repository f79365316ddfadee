"""The journal over HTTP: proofs, tlog-tiles hash tiles and entry bundles, who reads
which entries, and `ubc proof get|check`.

One ledger per engine with more than 256 entries (a batch of transfers) is served for
the whole module. Roots are recomputed here from the entries with a plain recursive
RFC 9162 Merkle Tree Hash, independent of ``ubc.journal.merkle``'s incremental one.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from nacl.signing import SigningKey
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from tests.conftest import POSTGRES_URL, _admin_conninfo, make_data_dir, run_server
from ubc.cli import app
from ubc.envelopes.payloads import format_timestamp, validate_payload
from ubc.envelopes.service import sign_payload
from ubc.journal.checkpoint import format_tlog_proof, parse_checkpoint, parse_tlog_proof
from ubc.journal.merkle import ProofError, verify_consistency, verify_inclusion
from ubc.journal.tiles import parse_entry_bundle, parse_tile
from ubc.signing import NoteSigner, NoteVerifier, encode_public_key, generate_signing_key

ORIGIN = "test.ubc/ledger"
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
IMMUTABLE = "public, max-age=31536000, immutable"
BATCH = 300
_names = itertools.count()


# --- a reference Merkle tree -------------------------------------------------------------


def leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def mth(leaves: tuple[bytes, ...]) -> bytes:
    """RFC 9162 §2.1.1 Merkle Tree Hash of leaf hashes, by its recursive definition."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)  # largest power of two < n
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def flipped(proof: list[bytes], rng: random.Random) -> list[bytes]:
    i = rng.randrange(len(proof))
    bit = rng.randrange(256)
    changed = bytearray(proof[i])
    changed[bit // 8] ^= 1 << (bit % 8)
    return [*proof[:i], bytes(changed), *proof[i + 1 :]]


# --- the ledger ----------------------------------------------------------------------------


def envelope(type_: str, keys: list[SigningKey], **fields: Any) -> dict[str, Any]:
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    body = {
        "ledger": ORIGIN,
        "id": str(uuid.uuid4()),
        "created_at": format_timestamp(datetime.now(UTC)),
        **fields,
    }
    return sign_payload(validate_payload(type_, body), type_, keys).to_json()


def transfer(key: SigningKey, src: str, dst: str, amount: int) -> dict[str, Any]:
    return envelope(
        "transfer",
        [key],
        actor=f"member:{src}",
        from_=f"member:{src}",
        to=f"member:{dst}",
        asset="CU",
        amount=amount,
    )


def post(client: httpx.Client, env: dict[str, Any]) -> int:
    response = client.post("/api/envelopes", json=env)
    assert response.status_code == 201, response.text
    seq: int = response.json()["seq"]
    return seq


def grant(client: httpx.Client, key: SigningKey, handle: str, scopes: list[str]) -> str:
    """Grant an API key to ``handle``; its secret."""
    secret = f"ubc_{handle}_{uuid.uuid4().hex}"
    post(
        client,
        envelope(
            "apikey.grant",
            [key],
            actor=f"member:{handle}",
            account=f"member:{handle}",
            label="-".join(scopes),
            key_hash=hashlib.sha256(secret.encode()).hexdigest(),
            scopes=scopes,
        ),
    )
    return secret


@dataclass
class Journal:
    url: str
    db_url: str
    data_dir: Path
    vkey: str
    auditor: str
    operator: str
    secrets: dict[str, str]  # bob-read, carol-read, carol-models
    entries: list[bytes]
    checkpoint: str
    batch_seqs: list[int]

    @property
    def size(self) -> int:
        return len(self.entries)

    @property
    def leaves(self) -> tuple[bytes, ...]:
        return tuple(leaf(e) for e in self.entries)

    def root(self, size: int) -> bytes:
        return _root(self.leaves[:size])


@cache
def _root(leaves: tuple[bytes, ...]) -> bytes:
    return mth(leaves)


def new_database(request: pytest.FixtureRequest, engine: str, root: Path) -> tuple[str, str]:
    """A fresh migrated database: its URL and, on PostgreSQL, its name to drop."""
    if engine == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = root / f"db{next(_names)}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}", ""
    template_name: str = request.getfixturevalue("postgres_template")
    name = f"ubc_jhttp_{os.getpid()}_{next(_names)}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    return url, name


@pytest.fixture(scope="module", params=ENGINES)
def journal(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Journal]:
    root = tmp_path_factory.mktemp(f"journal-{request.param}")
    db_url, dropped = new_database(request, request.param, root)
    try:
        data_dir = make_data_dir(root / "data")
        with run_server(db_url, data_dir) as server, httpx.Client(base_url=server.url) as c:
            operator = server.operator_key
            keys = {h: generate_signing_key() for h in ("alice", "bob", "carol")}
            for handle, key in keys.items():
                post(
                    c,
                    envelope(
                        "member.register",
                        [key],
                        actor=f"member:{handle}",
                        handle=handle,
                        public_key=encode_public_key(bytes(key.verify_key)),
                    ),
                )
                post(
                    c,
                    envelope(
                        "member.admit", [operator], actor="operator", handle=handle, tier="basic"
                    ),
                )
                post(
                    c,
                    envelope(
                        "deposit",
                        [operator],
                        actor="operator",
                        to=f"member:{handle}",
                        asset="CU",
                        amount=1000,
                        external_ref=f"bank-{handle}",
                    ),
                )
            secrets = {
                "bob-read": grant(c, keys["bob"], "bob", ["read"]),
                "carol-read": grant(c, keys["carol"], "carol", ["read"]),
                "carol-models": grant(c, keys["carol"], "carol", ["models"]),
            }
            post(c, transfer(keys["bob"], "bob", "carol", 5))
            post(c, transfer(keys["carol"], "carol", "alice", 3))
            batch = [transfer(keys["alice"], "alice", "bob", 1) for _ in range(BATCH)]
            response = c.post("/api/envelopes/batch", json={"atomic": True, "envelopes": batch})
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert {r["status"] for r in results} == {201}
            post(c, transfer(keys["bob"], "bob", "alice", 7))
            checkpoint = c.get("/journal/checkpoint").text
            size = int(checkpoint.split("\n")[1])
            auditor = {"Authorization": f"Bearer {server.auditor_token}"}
            items = c.get(
                "/journal/entries", params={"start": 0, "end": size}, headers=auditor
            ).json()["entries"]
            yield Journal(
                url=server.url,
                db_url=db_url,
                data_dir=data_dir,
                vkey=c.get("/api/ledger").json()["vkey"],
                auditor=server.auditor_token,
                operator=server.operator_token,
                secrets=secrets,
                entries=[base64.b64decode(i["entry"]) for i in items],
                checkpoint=checkpoint,
                batch_seqs=[r["body"]["seq"] for r in results],
            )
    finally:
        if dropped:
            with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dropped}" WITH (FORCE)')


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(journal: Journal) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=journal.url, timeout=30) as c:
        yield c


# --- entries and checkpoint -------------------------------------------------------------------


def test_the_journal_has_more_than_a_tile(journal: Journal) -> None:
    assert 1 + 9 + 3 + 2 + BATCH + 1 == journal.size > 256
    assert journal.batch_seqs == list(range(journal.batch_seqs[0], journal.batch_seqs[0] + BATCH))
    for seq, entry in enumerate(journal.entries):
        assert json.loads(entry)["seq"] == seq


def test_the_checkpoint_signs_the_root_of_the_entries(journal: Journal) -> None:
    text = NoteVerifier.from_vkey(journal.vkey).verify(journal.checkpoint)
    checkpoint = parse_checkpoint(text)
    assert (checkpoint.origin, checkpoint.size) == (ORIGIN, journal.size)
    assert checkpoint.root == journal.root(journal.size)


def test_entries_pages_and_leaf_hashes(journal: Journal, client: httpx.Client) -> None:
    answer = client.get(
        "/journal/entries", params={"start": 250, "end": 260}, headers=bearer(journal.operator)
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["size"] == journal.size
    assert [i["seq"] for i in body["entries"]] == list(range(250, 260))
    for item in body["entries"]:
        assert base64.b64decode(item["entry"]) == journal.entries[item["seq"]]
        assert item["leaf_hash"] == b64(journal.leaves[item["seq"]])
    beyond = client.get(
        "/journal/entries",
        params={"start": journal.size, "end": journal.size + 5},
        headers=bearer(journal.auditor),
    )
    assert beyond.json()["entries"] == []
    for params in ({"start": 5, "end": 5}, {"start": 0, "end": 1001}, {"start": -1, "end": 2}):
        answer = client.get("/journal/entries", params=params, headers=bearer(journal.auditor))
        assert answer.status_code in (400, 422), (params, answer.text)


# --- proofs ----------------------------------------------------------------------------------


def test_inclusion_proofs_for_random_seqs_and_sizes(journal: Journal, client: httpx.Client) -> None:
    rng = random.Random(6962)
    cases = [(0, 1), (journal.size - 1, journal.size), (255, 256), (256, 257)]
    for _ in range(30):
        size = rng.randint(1, journal.size)
        cases.append((rng.randrange(size), size))
    for seq, size in cases:
        answer = client.get("/journal/proof/inclusion", params={"seq": seq, "size": size})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        root = journal.root(size)
        assert (body["seq"], body["size"], body["root"]) == (seq, size, b64(root))
        assert body["leaf_hash"] == b64(journal.leaves[seq])
        proof = [base64.b64decode(h) for h in body["proof"]]
        verify_inclusion(journal.leaves[seq], seq, size, proof, root)
        if proof:
            with pytest.raises(ProofError):
                verify_inclusion(journal.leaves[seq], seq, size, flipped(proof, rng), root)
        if size > 1:
            other = (seq + rng.randrange(1, size)) % size
            with pytest.raises(ProofError):
                verify_inclusion(journal.leaves[seq], other, size, proof, root)
            with pytest.raises(ProofError):
                verify_inclusion(journal.leaves[other], seq, size, proof, root)
    # Without a size: the current tree.
    latest = client.get("/journal/proof/inclusion", params={"seq": 3}).json()
    assert latest["size"] == journal.size
    assert latest["root"] == b64(journal.root(journal.size))


def test_consistency_proofs_for_random_sizes(journal: Journal, client: httpx.Client) -> None:
    rng = random.Random(9162)
    cases = [(1, journal.size), (256, journal.size), (255, 257), (7, 7)]
    for _ in range(30):
        new = rng.randint(1, journal.size)
        cases.append((rng.randint(1, new), new))
    for old, new in cases:
        answer = client.get("/journal/proof/consistency", params={"old": old, "new": new})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        old_root, new_root = journal.root(old), journal.root(new)
        assert (body["old_root"], body["new_root"]) == (b64(old_root), b64(new_root))
        proof = [base64.b64decode(h) for h in body["proof"]]
        verify_consistency(old, new, old_root, new_root, proof)
        if old == new:
            assert proof == []
            continue
        with pytest.raises(ProofError):
            verify_consistency(old, new, old_root, new_root, flipped(proof, rng))
        with pytest.raises(ProofError):
            verify_consistency(old, new, journal.root(old - 1 or 2), new_root, proof)
        if old + 1 < new:
            with pytest.raises(ProofError):
                verify_consistency(old + 1, new, journal.root(old + 1), new_root, proof)


def test_proof_requests_out_of_range(journal: Journal, client: httpx.Client) -> None:
    n = journal.size
    for params in ({"seq": n, "size": n}, {"seq": 0, "size": n + 1}, {"seq": 5, "size": 5}):
        answer = client.get("/journal/proof/inclusion", params=params)
        assert answer.status_code == 400, (params, answer.text)
    for params in ({"old": 5, "new": 4}, {"old": 1, "new": n + 1}, {"old": 0, "new": 3}):
        answer = client.get("/journal/proof/consistency", params=params)
        assert answer.status_code in (400, 422), (params, answer.text)


# --- tiles -----------------------------------------------------------------------------------


def test_hash_tiles_are_public_and_full_ones_immutable(
    journal: Journal, client: httpx.Client
) -> None:
    width = journal.size - 256
    full = client.get("/journal/tile/0/000")
    assert full.status_code == 200
    assert full.headers["cache-control"] == IMMUTABLE
    assert parse_tile(full.content) == list(journal.leaves[:256])
    partial = client.get(f"/journal/tile/0/001.p/{width}")
    assert partial.status_code == 200
    assert "immutable" not in partial.headers.get("cache-control", "")
    assert parse_tile(partial.content, width) == list(journal.leaves[256:])
    # Level 1 holds the roots of complete 256-leaf subtrees: one so far, a partial tile.
    top = client.get("/journal/tile/1/000.p/1")
    assert top.status_code == 200
    assert "immutable" not in top.headers.get("cache-control", "")
    assert parse_tile(top.content, 1) == [journal.root(256)]
    # A narrower partial tile of a full tile is still served (tlog-tiles allows it).
    narrow = client.get("/journal/tile/0/000.p/5")
    assert narrow.status_code == 200
    assert narrow.content == full.content[: 5 * 32]
    for missing in (
        "/journal/tile/0/001",  # not full yet
        f"/journal/tile/0/001.p/{width + 1}",
        "/journal/tile/1/000",
        "/journal/tile/0/002.p/1",
        "/journal/tile/0/0",  # not the canonical spelling
        "/journal/tile/0/000.p/256",
    ):
        assert client.get(missing).status_code == 404, missing


def test_entry_bundles_are_for_the_operator_and_auditors(
    journal: Journal, client: httpx.Client
) -> None:
    width = journal.size - 256
    assert client.get("/journal/tile/entries/000").status_code == 403
    assert client.get("/journal/tile/entries/000", headers=bearer("nonsense")).status_code == 401
    member = client.get("/journal/tile/entries/000", headers=bearer(journal.secrets["bob-read"]))
    assert member.status_code == 403
    for token in (journal.auditor, journal.operator):
        full = client.get("/journal/tile/entries/000", headers=bearer(token))
        assert full.status_code == 200
        assert full.headers["cache-control"] == IMMUTABLE
        assert parse_entry_bundle(full.content) == journal.entries[:256]
        partial = client.get(f"/journal/tile/entries/001.p/{width}", headers=bearer(token))
        assert partial.status_code == 200
        assert "immutable" not in partial.headers.get("cache-control", "")
        assert parse_entry_bundle(partial.content, width) == journal.entries[256:]
    beyond = client.get("/journal/tile/entries/001", headers=bearer(journal.auditor))
    assert beyond.status_code == 404


def test_a_public_journal_serves_contents_to_anyone(journal: Journal) -> None:
    with (
        run_server(journal.db_url, journal.data_dir, journal_access="public") as server,
        httpx.Client(base_url=server.url) as client,
    ):
        bundle = client.get("/journal/tile/entries/000")
        assert bundle.status_code == 200
        assert bundle.headers["cache-control"] == IMMUTABLE
        assert parse_entry_bundle(bundle.content) == journal.entries[:256]
        items = client.get("/journal/entries", params={"start": 0, "end": 20}).json()["entries"]
        assert [base64.b64decode(i["entry"]) for i in items] == journal.entries[:20]


# --- members read their own entries -------------------------------------------------------------


def concerns(entry: bytes, address: str) -> bool:
    """Whether an entry is about ``address``: an effect on it, or a payload naming it."""
    body = json.loads(entry)
    if any(address in (e["debit"], e["credit"]) for e in body["effects"]):
        return True
    payload = json.loads(base64.b64decode(body["envelope"]["payload"]))
    handle = payload.get("handle")
    named = {payload.get("account"), payload.get("to"), payload.get("from")}
    return address in named or (handle is not None and address == f"member:{handle}")


def readable(client: httpx.Client, journal: Journal, token: str | None) -> set[int]:
    headers = bearer(token) if token else {}
    seen: set[int] = set()
    for start in range(0, journal.size, 1000):
        answer = client.get(
            "/journal/entries", params={"start": start, "end": start + 1000}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        for item in answer.json()["entries"]:
            assert item["leaf_hash"] == b64(journal.leaves[item["seq"]])
            if "entry" in item:
                assert base64.b64decode(item["entry"]) == journal.entries[item["seq"]]
                seen.add(item["seq"])
    return seen


def test_a_member_reads_only_its_own_entries(journal: Journal, client: httpx.Client) -> None:
    for handle, secret in (("bob", "bob-read"), ("carol", "carol-read")):
        own = {s for s, e in enumerate(journal.entries) if concerns(e, f"member:{handle}")}
        assert readable(client, journal, journal.secrets[secret]) == own
    bobs = readable(client, journal, journal.secrets["bob-read"])
    assert set(journal.batch_seqs) <= bobs  # alice → bob
    assert 0 not in bobs  # the genesis is nobody's
    assert readable(client, journal, None) == set()
    assert readable(client, journal, journal.auditor) == set(range(journal.size))


def test_an_api_key_without_the_read_scope_reads_no_entry(
    journal: Journal, client: httpx.Client, tmp_path: Path
) -> None:
    models = journal.secrets["carol-models"]
    answer = client.get("/api/accounts/member:carol", headers=bearer(models))
    assert answer.status_code == 403  # the account API refuses it
    assert readable(client, journal, models) == set()
    # ... while carol's key with the read scope reads her entries.
    own = {s for s, e in enumerate(journal.entries) if concerns(e, "member:carol")}
    assert own
    assert readable(client, journal, journal.secrets["carol-read"]) == own
    bundle = client.get("/journal/tile/entries/000", headers=bearer(models))
    assert bundle.status_code == 403
    # No receipt of her own entry either.
    code, output = cli(
        "proof",
        "get",
        str(min(own)),
        "--server",
        journal.url,
        "--token",
        models,
        "-o",
        str(tmp_path / "no"),
    )
    assert code == 1
    assert "may not read" in output
    assert not (tmp_path / "no").exists()


# --- receipts: ubc proof get | check --------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"UBC_TOKEN": None})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())


def test_proof_get_and_check_round_trip(journal: Journal, tmp_path: Path) -> None:
    seq = journal.batch_seqs[17]
    out = tmp_path / "receipt.tlog-proof"
    code, output = cli(
        "proof",
        "get",
        str(seq),
        "--server",
        journal.url,
        "--token",
        journal.auditor,
        "--vkey",
        journal.vkey,
        "-o",
        str(out),
    )
    assert code == 0, output
    parsed = parse_tlog_proof(out.read_text())
    assert parsed.index == seq
    assert parsed.extra == journal.entries[seq]
    assert parsed.checkpoint == journal.checkpoint
    code, output = cli("proof", "check", str(out), "--vkey", journal.vkey)
    assert code == 0
    assert f"Entry {seq} is included" in output
    # A member fetches the receipt of its own entry with its API key, not another's.
    mine = tmp_path / "bob.tlog-proof"
    code, output = cli(
        "proof",
        "get",
        str(seq),
        "--server",
        journal.url,
        "--token",
        journal.secrets["bob-read"],
        "-o",
        str(mine),
    )
    assert code == 0, output
    assert cli("proof", "check", str(mine), "--vkey", journal.vkey)[0] == 0
    code, output = cli(
        "proof",
        "get",
        "0",
        "--server",
        journal.url,
        "--token",
        journal.secrets["bob-read"],
        "-o",
        str(tmp_path / "no"),
    )
    assert code == 1
    assert "may not read" in output
    code, output = cli(
        "proof",
        "get",
        str(journal.size),
        "--server",
        journal.url,
        "--token",
        journal.auditor,
        "-o",
        str(tmp_path / "no"),
    )
    assert code == 1


def test_a_tampered_proof_file_fails(journal: Journal, tmp_path: Path) -> None:
    seq = 300
    out = tmp_path / "receipt.tlog-proof"
    code, output = cli(
        "proof",
        "get",
        str(seq),
        "--server",
        journal.url,
        "--token",
        journal.auditor,
        "--vkey",
        journal.vkey,
        "-o",
        str(out),
    )
    assert code == 0, output
    good = parse_tlog_proof(out.read_text())
    rng = random.Random(seq)
    other_entry = journal.entries[seq - 1]
    forged_note = NoteSigner(ORIGIN, generate_signing_key()).sign(
        journal.checkpoint.split("\n\n")[0] + "\n"
    )
    variants = {
        "flipped bit": format_tlog_proof(
            seq, flipped(list(good.proof), rng), good.checkpoint, extra=good.extra
        ),
        "wrong index": format_tlog_proof(seq - 1, good.proof, good.checkpoint, extra=good.extra),
        "other entry": format_tlog_proof(seq, good.proof, good.checkpoint, extra=other_entry),
        "edited entry": format_tlog_proof(
            seq,
            good.proof,
            good.checkpoint,
            extra=(good.extra or b"").replace(b'"amount":1', b'"amount":2'),
        ),
        "hash dropped": format_tlog_proof(seq, good.proof[:-1], good.checkpoint, extra=good.extra),
        "forged checkpoint": format_tlog_proof(seq, good.proof, forged_note, extra=good.extra),
        "no entry": format_tlog_proof(seq, good.proof, good.checkpoint),
        "garbage": "not a proof\n",
    }
    assert variants["edited entry"] != out.read_text()
    for name, text in variants.items():
        path = tmp_path / f"{name.replace(' ', '-')}.tlog-proof"
        path.write_text(text)
        code, output = cli("proof", "check", str(path), "--vkey", journal.vkey)
        assert code == 1, (name, output)
    # The right file under another ledger's vkey fails too.
    other = NoteSigner(ORIGIN, generate_signing_key()).vkey
    assert cli("proof", "check", str(out), "--vkey", other)[0] == 1
