"""Auditors' commands: ``ubc audit export|verify``, ``ubc restore``, ``ubc proof``."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import text

from ubc.audit.source import Journal, SourceError, open_source, write_export
from ubc.audit.verify import (
    Finding,
    Replayed,
    Report,
    VerifyError,
    compare_balances,
    compare_with_database,
    verify_journal,
)
from ubc.cli.member import saved_api_key
from ubc.config import configured_database_url
from ubc.db import make_engine
from ubc.dburl import missing_sqlite_file
from ubc.files import open_private
from ubc.journal.checkpoint import format_tlog_proof, parse_checkpoint, parse_tlog_proof
from ubc.journal.merkle import ProofError, leaf_hash, verify_inclusion
from ubc.migrations import upgrade
from ubc.signing import NoteError, NoteVerifier
from ubc.witness.quorum import WitnessPolicy

console = Console(stderr=True)
audit = typer.Typer(help="Export and verify the journal offline.", no_args_is_help=True)
proof = typer.Typer(help="Receipts: inclusion proofs of journal entries.", no_args_is_help=True)

Token = Annotated[
    str | None,
    typer.Option("--token", envvar="UBC_TOKEN", help="auditor or operator token for a server"),
]


Witnesses = Annotated[
    list[str] | None,
    typer.Option(
        "--witness",
        help="a witness's vkey (<name>+<hash>+<key>, type 0x04) whose cosignature the "
        "checkpoint must carry; repeat it for each witness",
    ),
]
Quorum = Annotated[
    int | None,
    typer.Option(
        "--quorum",
        help="how many of the --witness witnesses must have cosigned (default: all of them)",
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(audit, name="audit")
    app.command("restore")(restore)
    app.add_typer(proof, name="proof")


@audit.command("export")
def export(
    source: Annotated[
        str | None,
        typer.Argument(help="server URL or database URL [default: $UBC_DATABASE_URL]"),
    ] = None,
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write")],
    token: Token = None,
) -> None:
    """Write the journal (every entry and the latest checkpoint) to a file."""
    journal = _open(source or configured_database_url(), token)
    origin = journal.checkpoint.split("\n", 1)[0]
    # 0600: the journal names members and amounts; the umask must not widen it.
    with _progress(journal.size) as (progress, task), open_private(out) as f:
        counted = _counting(journal, lambda n: progress.advance(task, n))
        try:
            written = write_export(counted, f, origin=origin)
        except SourceError as exc:
            _fail(str(exc))
    console.print(f"Exported {written} entries and the checkpoint of size {journal.size} to {out}")


@audit.command("verify")
def verify(
    source: Annotated[str, typer.Argument(help="export file, server URL or database URL")],
    vkey: Annotated[str, typer.Option("--vkey", help="the ledger's trusted verifier key")],
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="a checkpoint saved earlier")
    ] = None,
    cosigned: Annotated[
        Path | None,
        typer.Option(
            "--cosigned-checkpoint",
            help="verify against this signed checkpoint (e.g. one carrying witnesses' "
            "cosignatures) instead of the one the source carries",
        ),
    ] = None,
    witness: Witnesses = None,
    quorum: Quorum = None,
    against: Annotated[
        str | None,
        typer.Option("--against", help="compare replayed balances with a live server or db"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
    token: Token = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="re-run in memory (default) or through the write path into a scratch "
            "database (`database`)",
        ),
    ] = None,
) -> None:
    """Verify signatures, Merkle root, consistency and every rule; exit 1 on any finding."""
    policy = _witness_policy(witness, quorum)
    journal = _open(source, token)
    if policy is not None and cosigned is None and source.startswith(("http://", "https://")):
        journal = _witnessed_journal(source, token, journal, policy)
    if cosigned is not None:
        journal = _with_checkpoint(journal, _read_note(cosigned))
    old = checkpoint.read_text(encoding="utf-8") if checkpoint else None
    compare = None if against is None else _comparison(against, token)
    with _progress(journal.size, quiet=as_json) as (progress, task):
        report = _run(
            lambda: verify_journal(
                journal,
                vkey,
                old_checkpoint=old,
                against=compare,
                progress=lambda n: progress.advance(task, n),
                engine=engine,
                witnesses=policy,
            )
        )
    _print_report(report, as_json)
    raise typer.Exit(code=0 if report.ok else 1)


def restore(
    export_file: Annotated[Path, typer.Argument(help="an export written by `ubc audit export`")],
    into: Annotated[str, typer.Option("--into", help="database URL to rebuild (empty)")],
    vkey: Annotated[str, typer.Option("--vkey", help="the ledger's trusted verifier key")],
) -> None:
    """Rebuild a complete database from an export with the same rules, verifying as it goes."""
    journal = _open(str(export_file), None)
    engine = make_engine(into)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            existing = connection.execute(text("SELECT count(*) FROM journal_entries")).scalar()
    finally:
        engine.dispose()
    if existing:
        console.print(f"[red]{into} already holds a journal; restore needs an empty database[/red]")
        raise typer.Exit(code=1)
    with _progress(journal.size) as (progress, task):
        report = _run(
            lambda: verify_journal(
                journal, vkey, into=into, progress=lambda n: progress.advance(task, n)
            )
        )
    _print_report(report, False)
    if not report.ok:
        console.print("[red]The export has findings: do not serve the restored database.[/red]")
        raise typer.Exit(code=1)
    console.print(f"Restored {report.entries} entries into {into}.")


@proof.command("get")
def proof_get(
    seq: Annotated[int, typer.Argument(help="the journal entry's sequence number")],
    server: Annotated[str, typer.Option("--server", envvar="UBC_SERVER")] = "http://127.0.0.1:8000",
    vkey: Annotated[
        str | None, typer.Option("--vkey", help="trusted vkey (default: ask the server)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o")] = None,
    token: Token = None,
    witness: Witnesses = None,
    quorum: Quorum = None,
) -> None:
    """Fetch and verify the inclusion proof of entry SEQ; write a C2SP tlog-proof file.

    The receipt keeps the checkpoint as served, with every signature line (the ledger's
    and any witness's cosignatures): the latest checkpoint when it is cosigned, else the
    largest one the ledger's witnesses cosigned if it covers the entry."""
    policy = _witness_policy(witness, quorum)
    token = token or saved_api_key()  # a member's own entries, with its API key
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=server, headers=headers, timeout=30) as client:
        trusted = vkey or client.get("/api/ledger").json()["vkey"]
        note = _receipt_checkpoint(client, seq, policy)
        size = int(note.split("\n")[1])
        answer = client.get("/journal/proof/inclusion", params={"seq": seq, "size": size})
        entries = client.get("/journal/entries", params={"start": seq, "end": seq + 1})
    if answer.status_code != 200:
        _fail(answer.json().get("error", {}).get("message", answer.text))
    item = entries.json()["entries"][0] if entries.status_code == 200 else {}
    if "entry" not in item:
        _fail("this key may not read that entry (a member reads only its own entries)")
    entry = base64.b64decode(item["entry"])
    hashes = [base64.b64decode(h) for h in answer.json()["proof"]]
    _check_proof(trusted, note, seq, entry, hashes)
    witnessed = _check_witnesses(policy, note)
    target = out or Path(f"proof-{seq}.tlog-proof")
    with open_private(target) as f:  # the proof carries a journal entry: 0600
        f.write(format_tlog_proof(seq, hashes, note, extra=entry))
    console.print(
        f"Entry {seq} is in the journal of size {size}{witnessed}: proof written to {target}"
    )


@proof.command("check")
def proof_check(
    file: Annotated[Path, typer.Argument(help="a tlog-proof file written by `ubc proof get`")],
    vkey: Annotated[str, typer.Option("--vkey", help="the ledger's trusted verifier key")],
    witness: Witnesses = None,
    quorum: Quorum = None,
) -> None:
    """Check a saved proof offline: checkpoint signature, the entry's inclusion, and the
    witnesses' cosignatures on the checkpoint when --witness is given."""
    policy = _witness_policy(witness, quorum)
    try:
        parsed = parse_tlog_proof(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        _fail(f"not a tlog-proof file: {exc}")
    if parsed.extra is None:
        _fail("the proof file does not carry the entry")
    _check_proof(vkey, parsed.checkpoint, parsed.index, parsed.extra, list(parsed.proof))
    witnessed = _check_witnesses(policy, parsed.checkpoint)
    console.print(f"Entry {parsed.index} is included in the signed checkpoint{witnessed}.")


def _receipt_checkpoint(client: httpx.Client, seq: int, policy: WitnessPolicy | None) -> str:
    """The checkpoint a receipt of entry ``seq`` is made against: the latest one when it
    carries cosignatures (as ``policy`` requires them, when given), else the largest
    checkpoint the ledger's witnesses cosigned (``GET /journal/checkpoint/cosigned``) if
    it covers the entry, else the latest one (which ``policy``, if any, then refuses)."""
    latest = client.get("/journal/checkpoint").text
    if _witnessed(latest, policy):
        return latest
    cosigned = client.get("/journal/checkpoint/cosigned")
    if cosigned.status_code == 200:
        note = cosigned.text
        try:
            covers = seq < parse_checkpoint(note.split("\n\n", 1)[0] + "\n").size
        except ValueError:
            covers = False
        if covers and (policy is None or _witnessed(note, policy)):
            return note
    return latest


def _witnessed(note: str, policy: WitnessPolicy | None) -> bool:
    """Whether ``note`` satisfies ``policy``; without one, whether it carries any line
    besides the ledger's own signature."""
    if policy is None:
        return note.rstrip("\n").count("\n\u2014 ") >= 2
    verdict = policy.check(note)
    return verdict.ok and not verdict.invalid


def _check_proof(vkey: str, note: str, seq: int, entry: bytes, hashes: list[bytes]) -> None:
    try:
        checkpoint = parse_checkpoint(NoteVerifier.from_vkey(vkey).verify(note))
        verify_inclusion(leaf_hash(entry), seq, checkpoint.size, hashes, checkpoint.root)
    except (NoteError, ProofError, ValueError) as exc:
        _fail(f"the proof does not verify: {exc}")


def _witness_policy(vkeys: list[str] | None, quorum: int | None) -> WitnessPolicy | None:
    """The witnesses required by --witness and --quorum; a usage error when they are not
    valid vkeys, name one key twice, or the quorum is not between 1 and their number."""
    if not vkeys:
        if quorum is not None:
            raise typer.BadParameter("--quorum needs at least one --witness", param_hint="--quorum")
        return None
    try:
        return WitnessPolicy.from_vkeys(vkeys, quorum)
    except ValueError as exc:
        hint = "--quorum" if "quorum" in str(exc) else "--witness"
        raise typer.BadParameter(str(exc), param_hint=hint) from None


def _check_witnesses(policy: WitnessPolicy | None, note: str) -> str:
    """Fail unless the checkpoint ``note`` carries the cosignatures ``policy`` requires
    (and none of its witnesses' lines is invalid); the phrase to print when it does."""
    if policy is None:
        return ""
    verdict = policy.check(note)
    if not verdict.ok or verdict.invalid:
        _fail(f"the checkpoint is not witnessed as required: {verdict.summary()}")
    return ", cosigned by " + ", ".join(r.describe() for r in verdict.cosigned)


def _read_note(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {path}: {exc}")


def _with_checkpoint(journal: Journal, note: str) -> Journal:
    """``journal`` verified against ``note`` instead of the checkpoint its source carries."""
    try:
        size = parse_checkpoint(note.split("\n\n", 1)[0] + "\n").size
    except ValueError as exc:
        _fail(f"not a signed checkpoint: {exc}")
    return Journal(note, size, journal.entries, journal.export)


def _witnessed_journal(
    url: str, token: str | None, latest: Journal, policy: WitnessPolicy
) -> Journal:
    """A live server's journal under a checkpoint ``policy``'s witnesses cosigned: the
    latest when it carries them, else (a busy ledger's latest is rarely cosigned yet) the
    largest one its witnesses cosigned (``GET /journal/checkpoint/cosigned``); without
    one, the latest, and the witness check reports what is missing."""
    if _witnessed(latest.checkpoint, policy):
        return latest
    try:
        return open_source(url, token=token, cosigned=True)
    except SourceError:
        return latest


def _open(source: str, token: str | None) -> Journal:
    if (missing := missing_sqlite_file(source)) is not None:
        _fail(f"no SQLite database at {missing} (give the URL of an existing database)")
    try:
        return open_source(source, token=token)
    except SourceError as exc:
        _fail(str(exc))


def _run(work: Callable[[], Report]) -> Report:
    try:
        return work()
    except (SourceError, VerifyError) as exc:
        _fail(str(exc))


def _comparison(against: str, token: str | None) -> Callable[[Replayed], list[Finding]]:
    """Compare the replay with a live database (balances, transfers, postings) or server
    (balances)."""
    if not against.startswith(("http://", "https://")):
        return lambda replayed: compare_with_database(replayed, against)
    return lambda replayed: compare_balances(replayed, _server_balances(against, token))


def _server_balances(against: str, token: str | None) -> dict[tuple[str, str], int]:
    balances: dict[tuple[str, str], int] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=against, headers=headers, timeout=30) as client:
        response = client.get("/api/accounts")
        if response.status_code != 200:
            _fail(f"cannot list accounts of {against}: {response.text}")
        for item in response.json()["accounts"]:
            balances[(item["address"], item["asset"])] = int(item["posted"])
    return balances


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        return
    if report.witnesses is not None:
        console.print(
            f"Witnesses (quorum {report.witnesses.quorum}): {report.witnesses.summary()}",
            soft_wrap=True,
        )
    if report.ok:
        console.print(
            f"[green]OK[/green]: {report.entries} entries verified, checkpoint size "
            f"{report.checkpoint_size}, root {report.root}"
        )
        return
    table = Table(title=f"{len(report.findings)} findings in {report.entries} entries")
    for column in ("entry", "rule", "expected", "found"):
        table.add_column(column, overflow="fold")
    for finding in report.findings:
        table.add_row(_seq(finding), finding.rule, finding.expected, finding.found)
    console.print(table)


def _seq(finding: Finding) -> str:
    return "-" if finding.seq is None else str(finding.seq)


class _progress:  # noqa: N801 - used as a context manager
    def __init__(self, total: int, *, quiet: bool = False) -> None:
        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet or total < 1000,
        )
        self.total = total

    def __enter__(self) -> tuple[Progress, TaskID]:
        self.progress.start()
        return self.progress, self.progress.add_task("journal", total=self.total)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _counting(journal: Journal, advance: Callable[[int], object]) -> Journal:
    def entries() -> Iterator[tuple[int, bytes]]:
        for item in journal.entries:
            yield item
            advance(1)

    return Journal(journal.checkpoint, journal.size, entries())


def _fail(message: str) -> NoReturn:
    console.print(f"[red]{message}[/red]")
    raise typer.Exit(code=1)
