"""``ubc demo``: the whole story on a fresh SQLite ledger, narrated.

A ledger is initialised and served on loopback; four members join in two tiers; an
epoch allocates their compute; they spend it on the local embedding model through the
official OpenAI SDK, send it, donate it to a cause that spends it in turn, sell and buy
it on the market; the epoch closes, the utilization report is printed, and the journal is
exported and verified offline by the auditor. Every step is a real signed envelope over
real HTTP, and the audit at the end must find nothing.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from nacl.signing import SigningKey
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ubc.audit.source import from_export, from_server, write_export
from ubc.audit.verify import verify_journal
from ubc.client import UbcClient
from ubc.config import Settings
from ubc.envelopes.payloads import format_timestamp
from ubc.signing import generate_signing_key, load_signing_key, write_signing_key, write_token

ORIGIN = "demo.ubc/ledger"
# One CU per token on the local embedding model, so that spending shows.
MODELS_TOML = """\
[models."all-minilm-l6-v2"]
backend = "local"
kind = "embeddings"
input_price = 1000
"""


class DemoFailed(RuntimeError):
    """A step did not do what the story says (the demo exits with status 1)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serving(settings: Settings) -> Iterator[str]:
    from ubc.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise DemoFailed("the ledger server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Story:
    def __init__(self, console: Console, directory: Path) -> None:
        self.console = console
        self.directory = directory
        self.step = 0
        self.clients: list[UbcClient] = []

    def say(self, title: str, text: str = "") -> None:
        self.step += 1
        self.console.print(f"\n[bold cyan]{self.step}. {escape(title)}[/bold cyan]")
        if text:
            self.console.print(escape(text))

    def note(self, text: str) -> None:
        self.console.print(f"   {escape(text)}")

    def client(self, url: str, **kwargs: Any) -> UbcClient:
        client = UbcClient(url, **kwargs)
        self.clients.append(client)
        return client

    def cu(self, client: UbcClient, address: str, asset: str = "CU") -> int:
        for row in client.balance(address)["balances"]:
            if row["asset"] == asset:
                return int(row["available"])
        return 0


def run_demo(directory: Path | None = None, console: Console | None = None) -> int:
    """Run the story; returns the number of audit findings (0 when all is well)."""
    console = console or Console(highlight=False)
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="ubc-demo-") as scratch:
            return _run(Path(scratch), console)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ubc.db").exists():
        raise DemoFailed(f"{directory} already holds a ledger: give the demo a fresh directory")
    return _run(directory, console)


def _run(directory: Path, console: Console) -> int:
    story = Story(console, directory)
    data = directory / "ubc-data"
    data.mkdir(mode=0o700)
    for name in ("ledger.key", "operator.key"):
        write_signing_key(data / name, generate_signing_key())
    for name in ("operator.token", "auditor.token"):
        write_token(data / name)
    models = directory / "models.toml"
    models.write_text(MODELS_TOML)
    settings = Settings(
        database_url=f"sqlite:///{directory / 'ubc.db'}",
        data_dir=data,
        origin=ORIGIN,
        models_file=models,
        hold_sweep_interval_seconds=0.5,
    )
    story.say(
        "A new ledger",
        f"`ubc init` wrote the ledger's and the operator's keys into {data}; the server "
        f"starts on an empty SQLite database ({directory / 'ubc.db'}) and writes the "
        "ledger's configuration (assets, prices of the models) as journal entry 0.",
    )
    from ubc.db import make_engine
    from ubc.migrations import upgrade

    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    with _serving(settings) as url:
        try:
            findings = _tell(story, url, data)
        finally:
            for client in story.clients:
                client.close()
    return findings


def _tell(story: Story, url: str, data: Path) -> int:
    operator = story.client(
        url,
        key=load_signing_key(data / "operator.key"),
        token=(data / "operator.token").read_text().strip(),
    )
    info = operator.ledger_info()
    story.note(f"Serving {info['origin']} on {url}; its vkey is {info['vkey']}")

    story.say(
        "Four members join",
        "Each makes an Ed25519 key on their own machine and signs a member.register; "
        "the operator admits them into a tier.",
    )
    members: dict[str, UbcClient] = {}
    for handle, tier, name in (
        ("alice", "basic", "Alice, a student"),
        ("bob", "basic", "Bob, a nurse"),
        ("carol", "pro", "Carol, a researcher"),
        ("dan", "basic", "Dan, a retired teacher"),
    ):
        key: SigningKey = generate_signing_key()
        member = story.client(url, key=key)
        member.register(handle, display_name=name)
        operator.admit(handle, tier)
        members[handle] = member
        story.note(f"{name}: member:{handle}, tier {tier}")

    story.say(
        "The operator opens epoch 1",
        "Every active member gets this epoch's compute from system:issuance: 2,000 CU in "
        "the basic tier, 5,000 CU in the pro tier. What is left above 300 CU expires "
        "when the epoch closes.",
    )
    now = datetime.now(UTC)
    opened = operator.submit(
        operator.envelope(
            "epoch.open",
            actor="operator",
            epoch=1,
            asset="CU",
            allocations={"basic": 2000, "pro": 5000},
            carryover_cap=300,
            starts_at=format_timestamp(now),
            ends_at=format_timestamp(now + timedelta(days=30)),
        )
    )
    story.note(f"Journal entry {opened['seq']}: {opened.get('summary')}")
    for handle, member in members.items():
        secret, _ = member.grant_api_key(f"{handle}'s laptop")
        member.token = secret
    story.note("Each member granted themselves an API key (the ledger keeps only its hash).")

    story.say(
        "Alice spends compute through the OpenAI SDK",
        "Her program is an ordinary OpenAI client; only base_url and the key change. The "
        "local embedding model (all-MiniLM-L6-v2, on this CPU) costs 1 CU per token.",
    )
    import openai

    assert members["alice"].token is not None
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=members["alice"].token, max_retries=0)
    sentences = [
        "Universal basic compute gives everyone a slice of model time.",
        "Spend it, send it, sell it or give it away.",
        "Every movement is signed, journaled and verifiable.",
    ]
    before = story.cu(members["alice"], "member:alice")
    with sdk:
        result = sdk.embeddings.create(model="all-minilm-l6-v2", input=sentences)
    _settled(story, members["alice"], "member:alice")
    after = story.cu(members["alice"], "member:alice")
    story.note(
        f"{len(result.data)} vectors of {len(result.data[0].embedding)} dimensions, "
        f"{result.usage.prompt_tokens} tokens: {before} → {after} CU "
        "(a hold before the call, the exact cost posted after it, by a ledger-signed "
        "usage entry)."
    )
    if before - after != result.usage.prompt_tokens:
        raise DemoFailed("the call was not billed at 1 CU per token")

    story.say("Alice sends 150 CU to Bob", "A transfer she signs; the ledger journals it.")
    sent = members["alice"].send("bob", 150, memo="for the night shift")
    story.note(f"Journal entry {sent['seq']}; Bob now has {story.cu(operator, 'member:bob')} CU")

    story.say(
        "A cause, and donations to it",
        "The operator registers 'open-research' with Carol as its steward; Bob and Dan "
        "donate part of their compute.",
    )
    operator.register_cause(
        "open-research",
        "Open research",
        "Compute for public-interest research",
        ["carol"],
    )
    members["bob"].donate("open-research", 400, memo="keep it open")
    members["dan"].donate("open-research", 900)
    cause = operator.cause("open-research")
    story.note(f"cause:open-research holds {story.cu(operator, 'cause:open-research')} CU")
    story.note(f"Donations so far: {cause.get('donated')} from {cause.get('donors')} donors")

    story.say(
        "The cause spends its compute",
        "Carol, as steward, grants an API key on the cause's account; the research "
        "program uses it through the same OpenAI SDK.",
    )
    cause_key, _ = members["carol"].grant_api_key(
        "research cluster", account="cause:open-research", scopes=("models",)
    )
    research = openai.OpenAI(base_url=f"{url}/v1", api_key=cause_key, max_retries=0)
    papers = [f"Abstract {i}: a study of shared compute allocation." for i in range(8)]
    with research:
        research.embeddings.create(model="all-minilm-l6-v2", input=papers)
    _settled(story, operator, "cause:open-research")
    story.note(f"cause:open-research now holds {story.cu(operator, 'cause:open-research')} CU")

    story.say(
        "Carol sells compute; Bob buys some",
        "Carol offers 1,000 CU for $5.00; the CU moves into market:escrow at once, so the "
        "offer is always backed. The operator credits Bob $3.00 (a card payment, by its "
        "external reference); Bob buys 400 CU, paying ceil(500 × 400 / 1000) = 200 cents.",
    )
    offer = members["carol"].sell(1000, 500)
    operator.deposit("bob", 300, asset="USD", external_ref="card-payment-0001")
    bought = members["bob"].buy(offer["id"], 400)
    story.note(f"Fill journaled as entry {bought['seq']}: one linked batch, value for value")
    story.note(
        f"Bob: {story.cu(operator, 'member:bob')} CU and "
        f"{story.cu(operator, 'member:bob', 'USD')} cents; Carol: "
        f"{story.cu(operator, 'member:carol', 'USD')} cents; 600 CU still on offer"
    )
    members["carol"].cancel_offer(offer["id"])
    story.note("Carol cancels the rest: the 600 CU come back from escrow.")

    story.say(
        "The operator closes epoch 1",
        "What each member could still spend above 300 CU expires to system:expired.",
    )
    closed = operator.submit(operator.envelope("epoch.close", actor="operator", epoch=1))
    story.note(f"Journal entry {closed['seq']}: {closed.get('summary')}")

    story.say("How much did everyone spend? The utilization report")
    report = operator._get("/api/reports/utilization", params={"epoch": 1})
    table = Table(title="Epoch 1, in CU (utilization = used on models / allocated)")
    columns = ("allocated", "used", "sent", "received", "donated", "sold", "bought", "expired")
    table.add_column("member")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("utilization", justify="right")
    for row in report["members"]:
        table.add_row(
            escape(row["address"].removeprefix("member:")),
            *(str(row[c]) for c in columns),
            f"{row['utilization']}%" if row["utilization"] is not None else "-",
        )
    story.console.print(table)

    story.say(
        "The auditor checks everything, offline",
        "The journal is exported with the auditor's token, then verified with nothing but "
        "the ledger's vkey: signatures, the Merkle root, the signed checkpoint, and a "
        "replay of every entry through the same rules into a scratch database.",
    )
    export = story.directory / "journal.jsonl"
    auditor_token = (data / "auditor.token").read_text().strip()
    with export.open("w", encoding="utf-8") as out:
        count = write_export(from_server(url, token=auditor_token), out, origin=info["origin"])
    verified = verify_journal(from_export(export), info["vkey"])
    story.note(f"Exported {count} entries to {export}")
    if verified.ok:
        story.console.print(
            f"   [green]ubc audit verify: {verified.entries} entries, root {verified.root}: "
            "no findings.[/green]"
        )
    else:
        for finding in verified.findings:
            story.console.print(f"   [red]{escape(str(finding))}[/red]")
    story.console.print(
        "\nEvery step above is also a command of its own: `ubc --help` lists them, the "
        "README walks through them."
    )
    return len(verified.findings)


def _settled(story: Story, reader: UbcClient, address: str) -> None:
    """Wait until the account's usage entries are written (they follow the answer)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        balances = reader.balance(address)["balances"]
        if all(row["pending_debits"] == 0 for row in balances):
            return
        time.sleep(0.05)
    raise DemoFailed(f"{address} still has a hold open")
