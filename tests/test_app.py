"""The service around the core: init, health, readiness, genesis, checkpoint, OpenAPI."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from tests.conftest import LiveServer, make_data_dir
from ubc.app import create_app
from ubc.cli import app as cli
from ubc.config import Settings
from ubc.db import make_engine, make_session_factory
from ubc.journal.checkpoint import parse_checkpoint
from ubc.runtime import SetupError, load_runtime
from ubc.signing import NoteVerifier, load_signing_key, verified_keyids
from ubc.signing.dsse import Envelope

runner = CliRunner()


def test_init_writes_keys_once_with_mode_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = runner.invoke(cli, ["init", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    for name in ("ledger.key", "operator.key", "operator.token", "auditor.token"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    assert "vkey" in result.output
    before = (data / "ledger.key").read_bytes()
    again = runner.invoke(cli, ["init", "--data-dir", str(data)])
    assert again.exit_code == 1
    assert "Refusing to overwrite" in again.output
    assert (data / "ledger.key").read_bytes() == before
    kept = runner.invoke(cli, ["init", "--data-dir", str(data), "--keep-existing"])
    assert kept.exit_code == 0
    assert (data / "ledger.key").read_bytes() == before


def test_health_and_readiness(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ok"


def test_readyz_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'blank.db'}"
    data = make_data_dir(tmp_path / "data")
    # Without its lifespan the app still answers probes: not ready, and why.
    app = create_app(Settings(database_url=db, data_dir=data))

    async def probe() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # runs no lifespan
        async with httpx.AsyncClient(transport=transport, base_url="http://ubc") as client:
            return await client.get("/readyz"), await client.get("/healthz")

    ready, health = asyncio.run(probe())
    assert ready.status_code == 503
    assert ready.json()["reason"] == "database not migrated"
    assert health.status_code == 200
    # Starting for real refuses with a clear message instead of serving a broken ledger.
    with pytest.raises(SetupError, match="ubc db upgrade"):
        load_runtime(Settings(database_url=db, data_dir=data), _session(db))


def _session(db: str) -> Session:
    return make_session_factory(make_engine(db))()


def test_genesis_is_entry_zero_and_the_checkpoint_verifies(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as client:
        info = client.get("/api/ledger").json()
        note = client.get("/journal/checkpoint").text
        entries = client.get(
            "/journal/entries",
            params={"start": 0, "end": 1},
            headers={"Authorization": f"Bearer {live_server.auditor_token}"},
        )
    verifier = NoteVerifier.from_vkey(info["vkey"])
    checkpoint = parse_checkpoint(verifier.verify(note))
    assert checkpoint.origin == "test.ubc/ledger"
    assert checkpoint.size == 1
    ledger_public = bytes(load_signing_key(live_server.data_dir / "ledger.key").verify_key)
    assert info["ledger_public_key"] == base64.b64encode(ledger_public).decode()
    if entries.status_code == 200:  # served once the journal endpoints exist
        entry = json.loads(base64.b64decode(entries.json()["entries"][0]["entry"]))
        envelope = Envelope.from_json(entry["envelope"])
        assert envelope.payload_type == "application/vnd.ubc.ledger.genesis+json"
        assert verified_keyids(envelope, {envelope.signatures[0].keyid: ledger_public})


def test_openapi_documents_every_payload_and_the_error_body(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as client:
        schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in (
        "Envelope",
        "Error",
        "TransferPayload",
        "MemberRegisterPayload",
        "DepositPayload",
        "WithdrawalPayload",
        "ApiKeyGrantPayload",
        "KeyRotatePayload",
    ):
        assert name in components
    post = schema["paths"]["/api/envelopes"]["post"]
    assert {"400", "401", "403", "404", "409", "413"} <= set(post["responses"])


def test_reads_need_a_bearer(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as client:
        response = client.get("/api/accounts/system:issuance")
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "unauthenticated"
        ok = client.get(
            "/api/accounts/system:issuance",
            headers={"Authorization": f"Bearer {live_server.operator_token}"},
        )
        assert ok.status_code == 200
        assert {b["asset"] for b in ok.json()["balances"]} == {"CU", "USD"}


def test_a_nul_character_in_a_url_is_a_clear_400(live_server: LiveServer) -> None:
    """PostgreSQL text cannot hold NUL: such a parameter never reaches a query."""
    headers = {"authorization": f"Bearer {live_server.operator_token}"}
    for path in (
        "/api/market/trades?limit=1&account=%00%C3%AD",
        "/api/market/offers?seller=member:a%00",
        "/api/accounts/member:a%00b/history",
    ):
        response = httpx.get(f"{live_server.url}{path}", headers=headers)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["type"] == "bad_request"
    assert httpx.get(f"{live_server.url}/api/market/offers").status_code == 200
