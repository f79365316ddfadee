"""The metered model endpoint through the official ``openai`` SDK, against a served ledger
and the loopback upstream of ``tests/upstream.py``.

Prices in these tests: ``chat-small`` costs 1 CU per input token and 2 CU per output token
(1,000 and 2,000 CU per 1K), so every cost below is ``input + 2 × output``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from tests.conftest import LiveServer, _free_port, make_data_dir, run_server
from tests.test_audit import Export, payload_of
from tests.test_cli_member import Person
from tests.upstream import FakeUpstream, run_upstream
from ubc.audit.source import from_database, from_export, write_export
from ubc.audit.verify import verify_journal
from ubc.client import UbcApiError, UbcClient, api_key_hash
from ubc.db import make_engine
from ubc.gateway.service import estimate_tokens, prompt_bound
from ubc.ledger.models import Account
from ubc.signing import (
    NoteSigner,
    canonical_json,
    generate_signing_key,
    load_signing_key,
    sign_envelope,
    vkey,
)

accounts_t = Account.__table__  # type: ignore[attr-defined]

MODELS_TOML = """
[models."chat-small"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-chat"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000
max_output_tokens = 64

[models."chat-limited"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000
rpm = 2

[models."chat-fail-500"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake:fail-500"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000

[models."chat-fail-400"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake:fail-400"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000

[models."chat-cut"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake:cut-after-0"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000

[models."chat-cut-stream"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake:cut-after-3"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000

[models."chat-slow"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake:slow-stream-150"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 2000

[models."embed-up"]
backend = "upstream"
kind = "embeddings"
url = "{api_base}"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
"""


@dataclass
class Env:
    server: LiveServer
    upstream: FakeUpstream
    operator: UbcClient
    clients: list[UbcClient]
    sdks: list[openai.OpenAI] = field(default_factory=list)

    def member(self, handle: str, cu: int, **grant: Any) -> tuple[UbcClient, str]:
        """An admitted member holding ``cu`` CU and a fresh API key (its secret)."""
        client = UbcClient(self.server.url, key=generate_signing_key())
        self.clients.append(client)
        client.register(handle)
        self.operator.admit(handle, "basic")
        if cu:
            self.operator.deposit(handle, cu, external_ref=f"seed-{handle}")
        secret, _ = client.grant_api_key("sdk", **grant)
        client.token = secret
        return client, secret

    def sdk(self, secret: str, **kwargs: Any) -> openai.OpenAI:
        """An SDK client of the endpoint (closed at the end of the test)."""
        client = openai.OpenAI(
            base_url=f"{self.server.url}/v1", api_key=secret, max_retries=0, **kwargs
        )
        self.sdks.append(client)
        return client

    def settled(self) -> None:
        """Wait until every usage entry is written and no model-call hold is open."""
        gateway = self.server.app.state.gateway
        deadline = time.monotonic() + 20
        while True:
            engine = make_engine(self.server.db_url, readonly=True)
            try:
                with engine.connect() as connection:
                    pending = connection.execute(
                        select(func.count())
                        .select_from(accounts_t)
                        .where(accounts_t.c.debits_pending != 0)
                    ).scalar_one()
            finally:
                engine.dispose()
            if pending == 0 and not gateway._settling:
                return
            if time.monotonic() > deadline:
                raise AssertionError("holds still open")
            time.sleep(0.05)


def balance(client: UbcClient, address: str | None = None) -> dict[str, int]:
    [row] = [b for b in client.balance(address)["balances"] if b["asset"] == "CU"]
    return row


@contextlib.contextmanager
def serve_gateway(
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models: Callable[[str], str] = lambda api_base: MODELS_TOML.format(api_base=api_base),
    **upstream: Any,
) -> Iterator[Env]:
    """A served ledger whose models file (``models`` of the upstream's base URL) points at
    a fake upstream (``upstream``: its options), with the operator's client; every member
    client and SDK the test made is closed at the end."""
    monkeypatch.setenv("UBC_TEST_UPSTREAM_KEY", "sk-upstream")
    with run_upstream(api_key="sk-upstream", **upstream) as fake:
        models_file = tmp_path / "models.toml"
        models_file.write_text(models(fake.api_base))
        data = make_data_dir(tmp_path / "data")
        with (
            run_server(db_url, data, models_file=models_file) as server,
            UbcClient(server.url, key=server.operator_key, token=server.operator_token) as op,
        ):
            made = Env(server, fake, op, [])
            try:
                yield made
            finally:
                for client in made.clients:
                    client.close()
                for sdk in made.sdks:
                    sdk.close()


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    with serve_gateway(db_url, tmp_path, monkeypatch) as made:
        yield made


def test_models_are_listed_with_their_journaled_prices(env: Env) -> None:
    _, secret = env.member("alice", 0)
    sdk = env.sdk(secret)
    models = {m.id: m for m in sdk.models.list()}
    assert {"all-minilm-l6-v2", "chat-small", "chat-limited", "embed-up"} <= set(models)
    assert models["chat-small"].model_extra == {
        "kind": "chat",
        "pricing": {"input": 1000, "output": 2000},
    }
    assert sdk.models.retrieve("chat-small").id == "chat-small"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-nonexistent")
    info = httpx.get(f"{env.server.url}/api/ledger").json()
    assert info["models"]["chat-small"] == {"input": 1000, "output": 2000}


def test_chat_bills_the_upstreams_usage_and_releases_the_rest(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    answer = sdk.chat.completions.create(
        model="chat-small",
        messages=[{"role": "user", "content": "say five words please"}],
        max_tokens=5,
    )
    assert answer.model == "chat-small"
    assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 5)
    forwarded = env.upstream.stats().last_request_body
    assert forwarded["model"] == "fake-chat"
    assert forwarded["max_tokens"] == 5
    env.settled()
    after = balance(member)
    assert after["posted"] == 1000 - (5 + 2 * 5)
    assert after["pending_debits"] == 0
    history = member.history()["items"]
    assert history[0]["kind"] == "usage"


def test_streaming_with_usage_bills_once(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    stream = sdk.chat.completions.create(
        model="chat-small",
        messages=[{"role": "user", "content": "one two three"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [f"tok{i}" for i in range(7)]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 7)
    assert all(c.model == "chat-small" for c in chunks)
    env.settled()
    assert balance(member)["posted"] == 1000 - (4 + 14)


def test_streaming_without_usage_option_hides_the_usage_chunk(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    chunks = list(
        env.sdk(secret).chat.completions.create(
            model="chat-small",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert env.upstream.stats().last_request_body["stream_options"] == {"include_usage": True}
    env.settled()
    assert balance(member)["posted"] == 1000 - (2 + 2 * 3)


def test_local_embeddings_float_and_base64(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    floats = sdk.embeddings.create(
        model="all-minilm-l6-v2", input=["a cat", "a dog"], encoding_format="float"
    )
    assert len(floats.data) == 2
    assert len(floats.data[0].embedding) == 384
    assert math.isclose(sum(x * x for x in floats.data[0].embedding), 1.0, rel_tol=1e-3)
    raw = httpx.post(
        f"{env.server.url}/v1/embeddings",
        headers={"authorization": f"Bearer {secret}"},
        json={"model": "all-minilm-l6-v2", "input": "a cat", "encoding_format": "base64"},
    ).json()
    vector = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    pairs = zip(vector, floats.data[0].embedding, strict=True)
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in pairs)
    # The SDK's default asks for base64 and decodes it.
    assert len(sdk.embeddings.create(model="all-minilm-l6-v2", input="x").data[0].embedding) == 384
    tokens = floats.usage.prompt_tokens + raw["usage"]["prompt_tokens"] + 3
    env.settled()
    # 1 CU per 1K tokens, at least 1 CU a call: three calls.
    assert balance(member)["posted"] == 1000 - 3
    assert tokens > 0


def test_upstream_embeddings_bill_the_upstreams_tokens(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    result = env.sdk(secret).embeddings.create(
        model="embed-up", input=["one two three", "four"], encoding_format="float"
    )
    assert result.usage.prompt_tokens == 4
    env.settled()
    assert balance(member)["posted"] == 1000 - 4


def test_errors_have_openais_shape_and_status(env: Env) -> None:
    _, secret = env.member("alice", 3)
    sdk = env.sdk(secret)
    with pytest.raises(openai.AuthenticationError) as bad_key:
        env.sdk("ubc_sk_nope").chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "hi"}]
        )
    assert bad_key.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="chat-small", messages=[])
    with pytest.raises(openai.APIStatusError) as broke:
        sdk.chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "a long prompt " * 20}]
        )
    assert broke.value.status_code == 402
    assert broke.value.code == "insufficient_quota"
    assert broke.value.type == "insufficient_quota"


def test_upstream_failure_bills_nothing(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    for model in ("chat-fail-500", "chat-cut"):
        with pytest.raises(openai.InternalServerError) as failed:
            sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert failed.value.status_code == 502
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model="chat-fail-400", messages=[{"role": "user", "content": "hi"}]
        )
    env.settled()
    assert balance(member)["posted"] == 1000


def test_rate_limit_answers_429_with_retry_after(env: Env) -> None:
    _, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    for _ in range(2):
        sdk.chat.completions.create(
            model="chat-limited", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(
            model="chat-limited", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_grant_rpm_and_model_list_are_enforced(env: Env) -> None:
    _, secret = env.member("alice", 1000, rpm=1, models=["chat-small"])
    sdk = env.sdk(secret)
    with pytest.raises(openai.PermissionDeniedError):
        sdk.embeddings.create(model="embed-up", input="x")
    sdk.chat.completions.create(
        model="chat-small", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )


def test_max_tokens_is_clamped_to_what_the_account_affords(env: Env) -> None:
    messages = [{"role": "user", "content": "hi"}]
    bound = prompt_bound({"messages": messages})
    member, secret = env.member("alice", bound + 2 * 10)
    answer = env.sdk(secret).chat.completions.create(
        model="chat-small", messages=messages, max_tokens=60
    )
    allowed = 10
    assert env.upstream.stats().last_request_body["max_tokens"] == allowed
    assert answer.usage is not None
    assert answer.usage.completion_tokens == min(allowed, 16)
    env.settled()
    assert balance(member)["posted"] == bound + 20 - (2 + 2 * answer.usage.completion_tokens)


def test_spend_cap_per_epoch(env: Env) -> None:
    member, secret = env.member("alice", 1000, spend_cap_per_epoch=30)
    sdk = env.sdk(secret)
    spent = 0
    refused: list[openai.APIStatusError] = []
    for _ in range(10):
        try:
            answer = sdk.chat.completions.create(
                model="chat-small", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        except openai.APIStatusError as exc:
            refused.append(exc)
            break
        assert answer.usage is not None
        spent += answer.usage.prompt_tokens + 2 * answer.usage.completion_tokens
    assert [e.status_code for e in refused] == [402]
    assert "spend cap" in refused[0].message
    env.settled()
    assert spent <= 30
    assert balance(member)["posted"] == 1000 - spent


def test_overspend_is_impossible_under_200_concurrent_calls(env: Env) -> None:
    """An account that covers about 20 calls gets 200 at once: it pays for exactly the
    calls that ran, never more than it had, and no hold is left."""
    messages = [{"role": "user", "content": "hi"}]
    bound = prompt_bound({"messages": messages})
    per_call_hold = bound + 2 * 4
    member, secret = env.member("alice", 20 * per_call_hold)

    async def run() -> list[Any]:
        sdk = openai.AsyncOpenAI(
            base_url=f"{env.server.url}/v1",
            api_key=secret,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=200), timeout=60
            ),
        )
        async with sdk:

            async def one() -> Any:
                try:
                    return await sdk.chat.completions.create(
                        model="chat-small", messages=messages, max_tokens=4
                    )
                except openai.APIStatusError as exc:
                    return exc

            return await asyncio.gather(*(one() for _ in range(200)))

    results = asyncio.run(run())
    ok = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert all(r.status_code == 402 for r in refused)
    assert 20 <= len(ok) < 200
    env.settled()
    billed = sum(r.usage.prompt_tokens + 2 * r.usage.completion_tokens for r in ok)
    after = balance(member)
    assert after["posted"] == 20 * per_call_hold - billed
    assert after["posted"] >= 0
    assert after["pending_debits"] == 0


def test_client_disconnect_cancels_upstream_and_bills_what_was_received(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    messages = [{"role": "user", "content": "tell me a long story"}]
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{env.server.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {secret}"},
            json={"model": "chat-slow", "messages": messages, "max_tokens": 40, "stream": True},
        ) as response,
    ):
        seen = 0
        for line in response.iter_lines():
            if '"content":"tok' in line:
                seen += 1
                if seen == 3:
                    break
    env.upstream.wait_for(lambda s: s.streams_cancelled == 1, timeout=10)
    [sent] = env.upstream.stats().cancelled_stream_tokens
    assert sent >= 3
    env.settled()
    expected = estimate_tokens(prompt_bound({"messages": messages})) + 2 * sent
    assert balance(member)["posted"] == 1000 - expected


def test_every_usage_entry_passes_the_audit(env: Env) -> None:
    _, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    sdk.chat.completions.create(
        model="chat-small", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    sdk.embeddings.create(model="all-minilm-l6-v2", input="hello")
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(
            model="chat-fail-500", messages=[{"role": "user", "content": "hi"}]
        )
    env.settled()
    report = verify_journal(
        from_database(env.server.db_url),
        vkey(env.server.settings.origin, bytes(env.server.ledger_key.verify_key)),
    )
    assert report.ok, report.findings
    key = api_key_hash(secret)
    assert key


def test_the_auditor_catches_a_usage_billed_above_its_prices(env: Env, tmp_path: Path) -> None:
    """A dishonest operator re-signs a usage entry with a higher cost (and the effects and
    checkpoint to match): the replay recomputes the cost from the journaled prices."""
    _, secret = env.member("alice", 1000)
    env.sdk(secret).chat.completions.create(
        model="chat-small", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    env.settled()
    path = tmp_path / "journal.jsonl"
    with path.open("w", encoding="utf-8") as out:
        write_export(from_database(env.server.db_url), out, origin=env.server.settings.origin)
    export = Export.read(path)
    [seq] = [
        s
        for s, e in export.entries
        if json.loads(e)["envelope"]["payloadType"].endswith(".usage+json")
    ]
    body = export.body(seq)
    payload = payload_of(body)
    payload["cost"] += 5
    ledger_key = env.server.ledger_key
    envelope = sign_envelope(
        body["envelope"]["payloadType"], canonical_json(payload), [ledger_key]
    ).to_json()
    effects = [dict(body["effects"][0], amount=payload["cost"])]
    export.replace(seq, {**body, "envelope": envelope, "effects": effects})
    export.resign(NoteSigner(env.server.settings.origin, ledger_key))
    report = verify_journal(
        from_export(export.write(tmp_path / "forged.jsonl")),
        vkey(env.server.settings.origin, bytes(ledger_key.verify_key)),
    )
    assert [(f.seq, f.rule) for f in report.findings] == [(seq, "envelope.usage")]
    assert "does not match the prices in force" in report.findings[0].found


def test_a_server_killed_mid_stream_leaves_a_hold_that_expires_unbilled(
    db_url: str, tmp_path: Path
) -> None:
    with run_upstream(api_key="sk-upstream") as upstream:
        models = tmp_path / "models.toml"
        models.write_text(MODELS_TOML.format(api_base=upstream.api_base))
        data = make_data_dir(tmp_path / "data")
        environment = {
            **os.environ,
            "UBC_DATABASE_URL": db_url,
            "UBC_DATA_DIR": str(data),
            "UBC_MODELS_FILE": str(models),
            "UBC_ORIGIN": "test.ubc/ledger",
            "UBC_GATEWAY_HOLD_TIMEOUT_SECONDS": "3",
            "UBC_HOLD_SWEEP_INTERVAL_SECONDS": "0.2",
            "UBC_TEST_UPSTREAM_KEY": "sk-upstream",
        }
        port = _free_port()
        url = f"http://127.0.0.1:{port}"

        def serve() -> subprocess.Popen[bytes]:
            process = subprocess.Popen(
                [sys.executable, "-c", "from ubc.cli import main; main()", "serve"]
                + ["--port", str(port)],
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        return process
                time.sleep(0.1)
            process.kill()
            raise AssertionError("the server did not start")

        first = serve()
        try:
            operator = UbcClient(
                url,
                key=load_signing_key(data / "operator.key"),
                token=(data / "operator.token").read_text().strip(),
            )
            member = UbcClient(url, key=generate_signing_key())
            member.register("alice")
            operator.admit("alice", "basic")
            operator.deposit("alice", 1000, external_ref="seed")
            secret, _ = member.grant_api_key("sdk")
            member.token = secret
            with (
                httpx.Client(timeout=30) as http,
                http.stream(
                    "POST",
                    f"{url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {secret}"},
                    json={
                        "model": "chat-slow",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 40,
                        "stream": True,
                    },
                ) as response,
            ):
                lines = response.iter_lines()
                while '"content":"tok1' not in next(lines):
                    pass
                first.kill()  # SIGKILL: no shutdown, no settlement
                first.wait()
        finally:
            first.kill()
        # The hold outlived the server.
        engine = make_engine(db_url, readonly=True)
        try:
            with engine.connect() as connection:
                posted, pending = connection.execute(
                    select(
                        accounts_t.c.credits_posted - accounts_t.c.debits_posted,
                        accounts_t.c.debits_pending,
                    ).where(accounts_t.c.address == "member:alice", accounts_t.c.asset == "CU")
                ).one()
        finally:
            engine.dispose()
        assert (posted, pending > 0) == (1000, True)
        second = serve()
        try:
            reader = UbcClient(url, token=secret)
            deadline = time.monotonic() + 20
            while balance(reader, "member:alice")["pending_debits"] and time.monotonic() < deadline:
                time.sleep(0.2)
            after = balance(reader, "member:alice")
            reader.close()
        finally:
            second.terminate()
            second.wait(timeout=20)
        operator.close()
        member.close()
    assert after["posted"] == 1000
    assert after["pending_debits"] == 0
    journal = from_database(db_url)
    types = [json.loads(e)["envelope"]["payloadType"] for _, e in journal.entries]
    assert types.count("application/vnd.ubc.hold.expire+json") == 1
    report = verify_journal(
        from_database(db_url),
        vkey("test.ubc/ledger", bytes(load_signing_key(data / "ledger.key").verify_key)),
    )
    assert report.ok, report.findings


def test_cli_lists_models_and_a_members_usage_by_day(env: Env, tmp_path: Path) -> None:
    _, secret = env.member("alice", 1000)
    sdk = env.sdk(secret)
    for _ in range(2):
        sdk.chat.completions.create(
            model="chat-small", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    sdk.embeddings.create(model="all-minilm-l6-v2", input="hello")
    env.settled()
    person = Person(tmp_path / "alice", UBC_SERVER=env.server.url, UBC_TOKEN=secret)
    listed = person.ok("models")
    assert "chat-small" in listed
    assert "all-minilm-l6-v2" in listed
    spend = person.ok("usage", "alice")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    rows = [line for line in spend.splitlines() if line.startswith(f"│ {today}")]
    assert len(rows) == 2
    chat = next(r for r in rows if "chat-small" in r).split("│")
    assert [c.strip() for c in chat[3:7]] == ["2", "4", "4", "12"]
    assert "Total: 13 CU." in spend
    bad = person.fails("usage", "alice", "--since", "yesterday")
    assert "is not a date" in bad
    # Another member's spend is not alice's to read.
    env.member("bob", 0)
    assert "may not read member:bob" in person.fails("usage", "bob")


def test_a_cause_spends_through_a_key_its_steward_granted(env: Env) -> None:
    steward, _ = env.member("carol", 0)
    outsider, _ = env.member("dan", 0)
    donor, _ = env.member("bob", 500)
    env.operator.register_cause("open-research", "Open research", "public science", ["carol"])
    donor.donate("open-research", 300)
    secret, _ = steward.grant_api_key("cluster", account="cause:open-research", scopes=("models",))
    with pytest.raises(UbcApiError) as refused:
        outsider.grant_api_key("mine", account="cause:open-research", scopes=("models",))
    assert refused.value.status == 403
    answer = env.sdk(secret).chat.completions.create(
        model="chat-small", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.usage is not None
    env.settled()
    cost = answer.usage.prompt_tokens + 2 * answer.usage.completion_tokens
    assert balance(env.operator, "cause:open-research")["posted"] == 300 - cost
    cause = env.operator.cause("open-research")
    assert cause["used_on_models"] == {"CU": cost}


def test_a_stream_cut_by_the_upstream_bills_what_was_received(env: Env) -> None:
    member, secret = env.member("alice", 1000)
    messages = [{"role": "user", "content": "tell me more"}]
    with httpx.Client(timeout=30) as http:
        response = http.post(
            f"{env.server.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {secret}"},
            json={"model": "chat-cut-stream", "messages": messages, "stream": True},
        )
    assert response.status_code == 200
    assert response.text.count('"content":"tok') == 3
    assert "[DONE]" not in response.text
    env.settled()
    expected = estimate_tokens(prompt_bound({"messages": messages})) + 2 * 3
    assert balance(member)["posted"] == 1000 - expected


def test_n_choices_are_held_for_and_max_completion_tokens_keeps_its_name(env: Env) -> None:
    messages = [{"role": "user", "content": "hi"}]
    bound = prompt_bound({"messages": messages})
    # Enough for 2 choices of 5 tokens, not for 2 of 20.
    _, secret = env.member("alice", bound + 2 * 2 * 5)
    env.sdk(secret).chat.completions.create(
        model="chat-small", messages=messages, n=2, max_completion_tokens=20
    )
    forwarded = env.upstream.stats().last_request_body
    assert forwarded["max_completion_tokens"] == 5
    assert "max_tokens" not in forwarded
