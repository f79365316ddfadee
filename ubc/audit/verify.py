"""Verify a journal offline: checkpoint signature, Merkle root, consistency, every rule.

The auditor trusts only the ledger's vkey. It checks the checkpoint's signature, streams
every entry (constant memory), recomputes the Merkle root incrementally, checks it
against the checkpoint and against an earlier checkpoint the auditor kept, and replays
every envelope through the same write path the server runs (``ubc.envelopes.service``
re-running the journal with its records as input, into a scratch database): signatures
under the keys valid at that point of the journal, the rules, and the effects derived,
compared with the effects recorded.
Findings are data, not the first exception: ``(seq, rule, expected, found)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from ubc.audit.source import Journal
from ubc.db import make_engine, make_session_factory
from ubc.envelopes import service as envelopes
from ubc.envelopes.payloads import LedgerGenesis, parse_timestamp, validate_payload
from ubc.journal import store as journal_store
from ubc.journal.checkpoint import Checkpoint, parse_checkpoint
from ubc.journal.merkle import append_leaves, leaf_hash, root_from_frontier
from ubc.journal.models import JournalEntry
from ubc.ledger import service as ledger
from ubc.ledger.models import Account, Posting, Transfer
from ubc.migrations import upgrade
from ubc.rules import Recorded
from ubc.signing import (
    Envelope,
    EnvelopeFormatError,
    NoteError,
    NoteVerifier,
    parse_payload,
    verified_keyids,
)
from ubc.signing.keys import key_id

accounts_t = Account.__table__  # type: ignore[attr-defined]
transfers_t = Transfer.__table__  # type: ignore[attr-defined]
postings_t = Posting.__table__  # type: ignore[attr-defined]
entries_t = JournalEntry.__table__  # type: ignore[attr-defined]

REPLAY_BATCH = 1000
# Holds are reservations, not movements (DESIGN 5): placing and releasing one is not
# journaled, so a live database's pending holds and their releases are not compared.
UNJOURNALED_PHASES = ("pending", "void")


@dataclass(frozen=True, slots=True)
class Finding:
    seq: int | None
    rule: str
    expected: str
    found: str


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)
    entries: int = 0
    checkpoint_size: int = 0
    root: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "checkpoint_size": self.checkpoint_size,
            "root": self.root,
            "findings": [asdict(f) for f in self.findings],
        }


ProgressFn = Callable[[int], None]


def verify_journal(
    journal: Journal,
    vkey: str,
    *,
    old_checkpoint: str | None = None,
    into: str | None = None,
    progress: ProgressFn | None = None,
    against: Callable[[str], list[Finding]] | None = None,
) -> Report:
    """Verify ``journal`` under ``vkey``.

    ``into`` is the database to replay into (default: a scratch SQLite file, removed at
    the end); ``ubc restore`` passes its target, and the journal's exact bytes are stored
    there too. ``against`` compares the replayed database (its URL) with a live ledger.
    """
    try:
        verifier = NoteVerifier.from_vkey(vkey)
    except (NoteError, ValueError) as exc:
        raise VerifyError(f"not a valid vkey: {exc}") from None
    report = Report()
    checkpoint = _checked_checkpoint(journal.checkpoint, verifier, report, "checkpoint")
    old = None
    if old_checkpoint is not None:
        old = _checked_checkpoint(old_checkpoint, verifier, report, "old_checkpoint")
    report.checkpoint_size = checkpoint.size if checkpoint else 0
    with tempfile.TemporaryDirectory(prefix="ubc-audit-") as scratch:
        url = into or f"sqlite:///{Path(scratch) / 'replay.db'}"
        engine = make_engine(url, durable=into is not None)
        # The signature pre-check reads keys in deferred transactions: it never waits
        # behind the replay's write lock.
        reader = make_engine(url, readonly=True)
        try:
            upgrade(engine)
            replayer = _Replayer(
                make_session_factory(engine),
                make_session_factory(reader),
                verifier,
                report,
                keep_journal=into is not None,
                checkpoint=journal.checkpoint,
            )
            try:
                replayer.run(journal.entries, checkpoint, old, progress)
                replayer.finish()
            finally:
                replayer.checker.shutdown(cancel_futures=True)
            _check_invariants(engine, report)
        finally:
            engine.dispose()
            reader.dispose()
        if against is not None:
            report.findings.extend(against(url))
    return report


class VerifyError(ValueError):
    """The verification cannot start (a malformed vkey)."""


def compare_with_database(replayed_url: str, live_url: str) -> list[Finding]:
    """Findings for every balance, transfer and posting of a live database that differs
    from the replayed ledger (each transfer named with its journal entry)."""
    findings = compare_balances(replayed_url, live_balances_from_database(live_url))
    replayed, live = _ledger_rows(replayed_url), _ledger_rows(live_url)
    seqs = _seqs_by_envelope(live_url)
    for kind in ("transfer", "posting"):
        want, got = replayed[kind], live[kind]
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                envelope_id = key[0].rsplit(":", 1)[0]
                findings.append(
                    Finding(
                        seqs.get(envelope_id),
                        f"{kind}.against",
                        f"{key}: {want.get(key)}",
                        f"live {got.get(key)}",
                    )
                )
    return findings


def compare_balances(replayed_url: str, live: dict[tuple[str, str], int]) -> list[Finding]:
    """Findings for every (account, asset) whose live posted balance differs from replay."""
    replayed = live_balances_from_database(replayed_url)
    findings = []
    for key in sorted(set(replayed) | set(live)):
        want, got = replayed.get(key), live.get(key)
        if want != got:
            findings.append(
                Finding(None, "balance.against", f"{key[0]} {key[1]} posted {want}", f"live {got}")
            )
    return findings


def live_balances_from_database(url: str) -> dict[tuple[str, str], int]:
    engine = make_engine(url, readonly=True)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(
                    accounts_t.c.address,
                    accounts_t.c.asset,
                    accounts_t.c.credits_posted - accounts_t.c.debits_posted,
                )
            ).all()
    finally:
        engine.dispose()
    return {(r[0], r[1]): int(r[2]) for r in rows}


# --- internals --------------------------------------------------------------------------


def _checked_checkpoint(
    note: str, verifier: NoteVerifier, report: Report, what: str
) -> Checkpoint | None:
    try:
        text = verifier.verify(note)
    except NoteError as exc:
        report.findings.append(
            Finding(None, f"{what}.signature", f"signed by {verifier.name}", str(exc))
        )
        text = note.split("\n\n", 1)[0] + "\n"
    try:
        checkpoint = parse_checkpoint(text)
    except ValueError as exc:
        report.findings.append(Finding(None, f"{what}.format", "a tlog-checkpoint", str(exc)))
        return None
    if checkpoint.origin != verifier.name:
        report.findings.append(Finding(None, f"{what}.origin", verifier.name, checkpoint.origin))
    return checkpoint


@dataclass(slots=True)
class _Group:
    committed_at: str = ""
    items: list[tuple[int, dict[str, Any], bytes]] = field(default_factory=list)


class _Replayer:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        read_sessions: sessionmaker[Session],
        verifier: NoteVerifier,
        report: Report,
        *,
        keep_journal: bool,
        checkpoint: str,
    ) -> None:
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.verifier = verifier
        self.report = report
        self.keep_journal = keep_journal
        self.checkpoint = checkpoint
        self.ctx: envelopes.LedgerContext | None = None
        self.group = _Group()
        self.checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ubc-audit")
        self.waiting: (
            tuple[_Group, envelopes.LedgerContext, Future[list[envelopes.Prechecked]]] | None
        ) = None
        self.size = 0

    def run(
        self,
        entries: Iterator[tuple[int, bytes]],
        checkpoint: Checkpoint | None,
        old: Checkpoint | None,
        progress: ProgressFn | None,
    ) -> None:
        findings = self.report.findings
        frontier: list[bytes] = []
        position = 0
        for label, entry in entries:
            nodes, frontier = append_leaves(position, frontier, [leaf_hash(entry)])
            del nodes
            position += 1
            if checkpoint is not None and position == checkpoint.size:
                root = root_from_frontier(position, frontier)
                self.report.root = base64.b64encode(root).decode()
                if root != checkpoint.root:
                    findings.append(
                        Finding(
                            position - 1,
                            "merkle.root",
                            f"root {base64.b64encode(checkpoint.root).decode()} "
                            f"at size {checkpoint.size}",
                            f"root {base64.b64encode(root).decode()} from the entries",
                        )
                    )
            if old is not None and position == old.size:
                root = root_from_frontier(position, frontier)
                if root != old.root:
                    findings.append(
                        Finding(
                            position - 1,
                            "merkle.consistency",
                            "the earlier checkpoint's root at size "
                            f"{old.size}: {base64.b64encode(old.root).decode()}",
                            f"{base64.b64encode(root).decode()}: history was rewritten",
                        )
                    )
            seq = position - 1
            if checkpoint is not None and seq >= checkpoint.size:
                findings.append(
                    Finding(
                        seq,
                        "journal.unsigned",
                        f"at most {checkpoint.size} entries under the checkpoint",
                        f"entry {seq} beyond it",
                    )
                )
            self._entry(seq, label, entry)
            if progress is not None:
                progress(1)
        self._flush()
        self.report.entries = position
        if checkpoint is not None and position < checkpoint.size:
            findings.append(
                Finding(
                    position, "journal.missing", f"{checkpoint.size} entries", f"{position} entries"
                )
            )
        if old is not None and position < old.size:
            findings.append(
                Finding(
                    None,
                    "merkle.consistency",
                    f"at least {old.size} entries",
                    f"{position} entries",
                )
            )
        if old is not None and checkpoint is not None and old.size > checkpoint.size:
            findings.append(
                Finding(
                    None,
                    "merkle.consistency",
                    f"a checkpoint of size ≥ {old.size}",
                    f"size {checkpoint.size}: the log shrank",
                )
            )

    def _entry(self, seq: int, label: int, entry: bytes) -> None:
        findings = self.report.findings
        try:
            body = json.loads(entry)
            recorded_seq = body["seq"]
            envelope_json = body["envelope"]
            effects = body["effects"]
            committed_at = body["committed_at"]
        except (ValueError, KeyError, TypeError) as exc:
            findings.append(Finding(seq, "entry.format", "a journal entry", str(exc)))
            return
        if recorded_seq != seq or label != seq:
            findings.append(
                Finding(
                    seq,
                    "journal.sequence",
                    f"entry {seq}",
                    f"entry labelled {label} recording seq {recorded_seq}",
                )
            )
        if seq == 0:
            self._genesis(envelope_json, effects, entry)
            return
        if self.ctx is None:
            findings.append(Finding(seq, "journal.genesis", "a genesis entry first", "none"))
            return
        if self.group.items and (
            self.group.committed_at != committed_at or len(self.group.items) >= REPLAY_BATCH
        ):
            self._flush()
        self.group.committed_at = committed_at
        self.group.items.append((seq, body, entry))

    def _genesis(self, envelope_json: Any, effects: Any, entry: bytes) -> None:
        findings = self.report.findings
        try:
            envelope = Envelope.from_json(envelope_json)
            payload = validate_payload("ledger.genesis", parse_payload(envelope.payload))
        except (EnvelopeFormatError, ValueError) as exc:
            findings.append(Finding(0, "genesis.format", "a ledger.genesis envelope", str(exc)))
            return
        public = self.verifier.public_key
        if not verified_keyids(envelope, {key_id(public): public}):
            findings.append(
                Finding(
                    0,
                    "genesis.signature",
                    "signed by the ledger key of the vkey",
                    "no valid ledger signature",
                )
            )
            return
        assert isinstance(payload, LedgerGenesis)
        if payload.ledger != self.verifier.name:
            findings.append(Finding(0, "genesis.origin", self.verifier.name, payload.ledger))
        if effects != []:
            findings.append(Finding(0, "genesis.effects", "[]", json.dumps(effects)))
        self.ctx = envelopes.context_from_genesis(payload, skew=timedelta(days=36500))
        with self.sessions() as session, session.begin():
            journal_store.create_head(session)
            envelopes.apply_genesis(session, payload)
            if self.keep_journal:
                ledger.record(
                    session,
                    payload.id,
                    hashlib.sha256(envelope.payload).digest(),
                    ledger.Applied(payload.id, ()),
                    now=parse_timestamp(payload.created_at),
                )
                self._store(
                    session,
                    [
                        journal_store.RawEntry(
                            payload.id, "ledger.genesis", "ledger", frozenset(), entry
                        )
                    ],
                    parse_timestamp(payload.created_at),
                )

    def _flush(self) -> None:
        """Queue the current group: its signatures are checked in a worker thread (libsodium
        releases the GIL) while the group before it is applied here."""
        group, self.group = self.group, _Group()
        if not group.items or self.ctx is None:
            return
        ctx = self.ctx
        raws = [body["envelope"] for _, body, _ in group.items]
        checked = self.checker.submit(self._precheck, ctx, raws)
        self._apply_waiting()
        self.waiting = (group, ctx, checked)

    def _precheck(
        self, ctx: envelopes.LedgerContext, raws: list[object]
    ) -> list[envelopes.Prechecked]:
        # Keys registered by the group still being applied are not visible yet: the write
        # path verifies those signatures itself.
        with self.read_sessions() as session:
            return envelopes.precheck(session, ctx, raws)

    def _apply_waiting(self) -> None:
        if self.waiting is None:
            return
        group, ctx, checked = self.waiting
        self.waiting = None
        now = parse_timestamp(group.committed_at)
        # What the journal recorded beyond each envelope: the rules' input for what was
        # never journaled (holds settled by usage, released by hold.expire, or that limited
        # an epoch's expiry).
        recorded = {
            _payload_id(body): Recorded(
                tuple(body["effects"]) if isinstance(body["effects"], list) else (),
                body.get("summary") if isinstance(body.get("summary"), dict) else None,
            )
            for _, body, _ in group.items
        }
        with self.sessions() as session, session.begin():
            outcomes = envelopes.submit(
                session, ctx, checked.result(), now=now, replay=envelopes.Replay(recorded)
            )
            rows = []
            for (seq, body, entry), outcome in zip(group.items, outcomes, strict=True):
                kind = _type_of(body)
                if isinstance(outcome, envelopes.Accepted) and outcome.repeated:
                    self.report.findings.append(
                        Finding(
                            seq,
                            "journal.duplicate",
                            "each envelope journaled once",
                            f"envelope {outcome.receipt.id} again",
                        )
                    )
                elif isinstance(outcome, envelopes.Accepted):
                    receipt = outcome.receipt
                    rows.append(
                        journal_store.RawEntry(
                            receipt.id, receipt.type, receipt.actor, receipt.accounts, entry
                        )
                    )
                    derived = receipt.effects
                    if receipt.summary != body.get("summary"):
                        self.report.findings.append(
                            Finding(
                                seq,
                                f"summary.{kind}",
                                json.dumps(receipt.summary, sort_keys=True),
                                json.dumps(body.get("summary"), sort_keys=True),
                            )
                        )
                    if derived != body["effects"]:
                        self.report.findings.append(
                            Finding(
                                seq,
                                f"effects.{kind}",
                                json.dumps(derived, sort_keys=True),
                                json.dumps(body["effects"], sort_keys=True),
                            )
                        )
                else:
                    self.report.findings.append(
                        Finding(
                            seq,
                            f"envelope.{kind}",
                            "accepted under the ledger's rules",
                            f"{outcome.status_code} {outcome.error_type}: {outcome.message}",
                        )
                    )
            if self.keep_journal:
                self._store(session, rows, now)

    def _store(self, session: Session, rows: list[journal_store.RawEntry], now: datetime) -> None:
        """Keep the journal's exact bytes (restore); the exported checkpoint comes last."""
        self.size += len(journal_store.append_raw(session, self.size, rows, now=now))

    def finish(self) -> None:
        self._apply_waiting()
        self.checker.shutdown()
        if self.keep_journal:
            with self.sessions() as session, session.begin():
                journal_store.set_checkpoint(session, self.checkpoint)


def _check_invariants(engine: Engine, report: Report) -> None:
    with engine.connect() as connection:
        sums = connection.execute(
            select(
                accounts_t.c.asset,
                func.sum(accounts_t.c.credits_posted - accounts_t.c.debits_posted),
                func.sum(accounts_t.c.credits_pending - accounts_t.c.debits_pending),
            ).group_by(accounts_t.c.asset)
        ).all()
        negative = connection.execute(
            select(accounts_t.c.address, accounts_t.c.asset).where(
                accounts_t.c.non_negative,
                accounts_t.c.credits_posted
                - accounts_t.c.debits_posted
                - accounts_t.c.debits_pending
                < 0,
            )
        ).all()
    for asset, posted, pending in sums:
        if int(posted or 0) != 0 or int(pending or 0) != 0:
            report.findings.append(
                Finding(
                    None,
                    "double_entry",
                    f"{asset} balances sum to 0",
                    f"posted {posted}, pending {pending}",
                )
            )
    for address, asset in negative:
        report.findings.append(
            Finding(None, "non_negative", f"{address} {asset} ≥ 0", "below zero")
        )


def _ledger_rows(url: str) -> dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]:
    """Transfers and postings by key, in comparable form (addresses, not row ids).

    Postings are compared by what they moved (sums per transfer, account and side), not by
    their balance-after, which depends on the order batches were applied in.
    """
    engine = make_engine(url, readonly=True)
    debit = accounts_t.alias("debit")
    credit = accounts_t.alias("credit")
    account = accounts_t.alias("account")
    try:
        with engine.connect() as connection:
            transfers: dict[tuple[Any, ...], tuple[Any, ...]] = {
                (r[0],): tuple(r[1:])
                for r in connection.execute(
                    select(
                        transfers_t.c.id,
                        debit.c.address,
                        credit.c.address,
                        transfers_t.c.asset,
                        transfers_t.c.amount,
                        transfers_t.c.kind,
                        transfers_t.c.phase,
                        transfers_t.c.pending_id,
                        transfers_t.c.state,
                    )
                    .join(debit, debit.c.id == transfers_t.c.debit_account_id)
                    .join(credit, credit.c.id == transfers_t.c.credit_account_id)
                    .where(transfers_t.c.phase.not_in(UNJOURNALED_PHASES))
                )
            }
            postings: dict[tuple[Any, ...], tuple[Any, ...]] = {
                (r[0], r[1], r[2]): (int(r[3]), int(r[4]))
                for r in connection.execute(
                    select(
                        postings_t.c.transfer_id,
                        account.c.address,
                        postings_t.c.side,
                        func.sum(postings_t.c.posted),
                        func.sum(postings_t.c.pending),
                    )
                    .join(account, account.c.id == postings_t.c.account_id)
                    .join(transfers_t, transfers_t.c.id == postings_t.c.transfer_id)
                    .where(transfers_t.c.phase.not_in(UNJOURNALED_PHASES))
                    .group_by(postings_t.c.transfer_id, account.c.address, postings_t.c.side)
                )
            }
    finally:
        engine.dispose()
    return {"transfer": transfers, "posting": postings}


def _seqs_by_envelope(url: str) -> dict[str, int]:
    engine = make_engine(url, readonly=True)
    try:
        with engine.connect() as connection:
            return {
                str(r[0]): int(r[1])
                for r in connection.execute(select(entries_t.c.envelope_id, entries_t.c.seq))
            }
    finally:
        engine.dispose()


def _payload_id(body: dict[str, Any]) -> str:
    try:
        payload = json.loads(base64.b64decode(body["envelope"]["payload"]))
        return str(payload["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def _type_of(body: dict[str, Any]) -> str:
    payload_type = str(body.get("envelope", {}).get("payloadType", ""))
    return payload_type.removeprefix("application/vnd.ubc.").removesuffix("+json") or "unknown"
