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
import gc
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from ubc.audit import workers
from ubc.audit.memory import IdTable, MemoryState, fingerprint_value
from ubc.audit.source import Journal, export_blocks, export_ranges, parse_export_line
from ubc.db import make_engine, make_session_factory, table
from ubc.envelopes import service as envelopes
from ubc.envelopes.payloads import LedgerGenesis, parse_timestamp, payload_json, validate_payload
from ubc.envelopes.registry import REGISTRY
from ubc.errors import IdempotencyConflict, InvalidPayload, MissingSignature, UbcError
from ubc.journal import store as journal_store
from ubc.journal.checkpoint import Checkpoint, parse_checkpoint
from ubc.journal.merkle import append_leaves, leaf_hash, node_hash, root_from_frontier
from ubc.journal.models import JournalEntry
from ubc.ledger import service as ledger
from ubc.ledger.engine import Effect
from ubc.ledger.models import Account, Posting, Transfer
from ubc.ledger.service import operations_fingerprint
from ubc.migrations import upgrade
from ubc.rules import Recorded, RuleContext, Signers, authenticate
from ubc.signing import (
    Envelope,
    EnvelopeFormatError,
    NoteError,
    NoteVerifier,
    Signature,
    parse_payload,
    verified_keyids,
)
from ubc.signing.keys import key_id
from ubc.witness.quorum import WitnessPolicy, WitnessVerdict

accounts_t = table(Account)
transfers_t = table(Transfer)
postings_t = table(Posting)
entries_t = table(JournalEntry)

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
    #: The witnesses' verdicts on the checkpoint, when witnesses were required.
    witnesses: WitnessVerdict | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "entries": self.entries,
            "checkpoint_size": self.checkpoint_size,
            "root": self.root,
            "findings": [asdict(f) for f in self.findings],
        }
        if self.witnesses is not None:
            out["quorum"] = self.witnesses.quorum
            out["witnesses"] = [r.to_json() for r in self.witnesses.results]
        return out


ProgressFn = Callable[[int], None]


#: How ``verify`` re-runs a journal unless told: in memory ("memory"), or through the
#: server's write path into a scratch database ("database").
DEFAULT_ENGINE = "memory"
ENGINES = ("memory", "database")

#: What a comparison with a live ledger is given: the replayed database's URL
#: (``restore``, ``engine="database"``) or the in-memory state.
Replayed = str | MemoryState


def verify_journal(
    journal: Journal,
    vkey: str,
    *,
    old_checkpoint: str | None = None,
    into: str | None = None,
    progress: ProgressFn | None = None,
    against: Callable[[Replayed], list[Finding]] | None = None,
    engine: str | None = None,
    witnesses: WitnessPolicy | None = None,
) -> Report:
    """Verify ``journal`` under ``vkey``.

    By default the journal is re-run in memory (:mod:`ubc.audit.memory`), decoding and
    signature checks in worker processes: no database. ``into`` (``ubc restore``) re-runs
    it through the server's write path into that database instead, and stores the
    journal's exact bytes there; ``engine="database"`` does the same into a scratch
    SQLite file removed at the end. ``against`` compares the replayed ledger (the state,
    or the database's URL) with a live ledger. ``witnesses``: the checkpoint must carry
    valid cosignatures from at least that many of those witnesses.
    """
    try:
        verifier = NoteVerifier.from_vkey(vkey)
    except (NoteError, ValueError) as exc:
        raise VerifyError(f"not a valid vkey: {exc}") from None
    engine = engine or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise VerifyError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    report = Report()
    checkpoint = _checked_checkpoint(journal.checkpoint, verifier, report, "checkpoint")
    if witnesses is not None:
        _check_witnesses(journal.checkpoint, witnesses, report)
    old = None
    if old_checkpoint is not None:
        old = _checked_checkpoint(old_checkpoint, verifier, report, "old_checkpoint")
    report.checkpoint_size = checkpoint.size if checkpoint else 0
    if into is None and engine == "memory":
        memory = _MemoryReplayer(
            verifier, report, keep_rows=against is not None, expected=journal.size
        )
        memory.run(journal, checkpoint, old, progress)
        memory.check_invariants()
        if against is not None:
            report.findings.extend(against(memory.state))
        return report
    with tempfile.TemporaryDirectory(prefix="ubc-audit-") as scratch:
        url = into or f"sqlite:///{Path(scratch) / 'replay.db'}"
        db = make_engine(url, durable=into is not None)
        # The signature pre-check reads keys in deferred transactions: it never waits
        # behind the replay's write lock.
        reader = make_engine(url, readonly=True)
        try:
            upgrade(db)
            replayer = _Replayer(
                make_session_factory(db),
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
            _check_invariants(db, report)
        finally:
            db.dispose()
            reader.dispose()
        if against is not None:
            report.findings.extend(against(url))
    return report


class VerifyError(ValueError):
    """The verification cannot start (a malformed vkey)."""


def compare_with_database(replayed_ledger: Replayed, live_url: str) -> list[Finding]:
    """Findings for every balance, transfer and posting of a live database that differs
    from the replayed ledger (each transfer named with its journal entry)."""
    findings = compare_balances(replayed_ledger, live_balances_from_database(live_url))
    if isinstance(replayed_ledger, MemoryState):
        replayed = {"transfer": replayed_ledger.transfers, "posting": replayed_ledger.postings}
    else:
        replayed = _ledger_rows(replayed_ledger)
    live = _ledger_rows(live_url)
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


def compare_balances(replayed_ledger: Replayed, live: dict[tuple[str, str], int]) -> list[Finding]:
    """Findings for every (account, asset) whose live posted balance differs from replay."""
    if isinstance(replayed_ledger, MemoryState):
        replayed = replayed_ledger.balances()
    else:
        replayed = live_balances_from_database(replayed_ledger)
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
                    (accounts_t.c.credits_posted - accounts_t.c.debits_posted).label("balance"),
                )
            ).all()
    finally:
        engine.dispose()
    return {(r.address, r.asset): int(r.balance) for r in rows}


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


def _check_witnesses(note: str, policy: WitnessPolicy, report: Report) -> None:
    """A finding for every given witness's cosignature that does not verify, and one if
    fewer than the quorum cosigned (``checkpoint.cosignature``, ``checkpoint.witnesses``)."""
    verdict = policy.check(note)
    report.witnesses = verdict
    for result in verdict.invalid:
        report.findings.append(
            Finding(
                None,
                "checkpoint.cosignature",
                f"a valid cosignature by {result.name}",
                result.reason or "invalid",
            )
        )
    if not verdict.ok:
        names = ", ".join(r.name for r in verdict.results)
        report.findings.append(
            Finding(
                None,
                "checkpoint.witnesses",
                f"cosignatures by at least {verdict.quorum} of {names}",
                verdict.summary(),
            )
        )


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
            _, frontier = append_leaves(position, frontier, [leaf_hash(entry)])
            position += 1
            _check_position(findings, position, frontier, checkpoint, old, self.report)
            self._entry(position - 1, label, entry)
            if progress is not None:
                progress(1)
        self._flush()
        self.report.entries = position
        _check_end(findings, position, checkpoint, old)

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
        checked = check_genesis(envelope_json, effects, self.verifier, self.report.findings)
        if checked is None:
            return
        envelope, payload = checked
        self.ctx = envelopes.context_from_genesis(payload, skew=timedelta(days=36500))
        self.ledger_keyid = self.ctx.ledger_keyid
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


def _check_position(
    findings: list[Finding],
    position: int,
    frontier: list[bytes],
    checkpoint: Checkpoint | None,
    old: Checkpoint | None,
    report: Report,
) -> None:
    """The Merkle root at the checkpoints' sizes, and entries beyond the checkpoint."""
    if checkpoint is not None and position == checkpoint.size:
        root = root_from_frontier(position, frontier)
        report.root = base64.b64encode(root).decode()
        if root != checkpoint.root:
            findings.append(
                Finding(
                    position - 1,
                    "merkle.root",
                    f"root {base64.b64encode(checkpoint.root).decode()} at size {checkpoint.size}",
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


def _check_end(
    findings: list[Finding], position: int, checkpoint: Checkpoint | None, old: Checkpoint | None
) -> None:
    if checkpoint is not None and position < checkpoint.size:
        findings.append(
            Finding(
                position, "journal.missing", f"{checkpoint.size} entries", f"{position} entries"
            )
        )
    if old is not None and position < old.size:
        findings.append(
            Finding(
                None, "merkle.consistency", f"at least {old.size} entries", f"{position} entries"
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
                (r.id,): (
                    r.debit,
                    r.credit,
                    r.asset,
                    r.amount,
                    r.kind,
                    r.phase,
                    r.pending_id,
                    r.state,
                )
                for r in connection.execute(
                    select(
                        transfers_t.c.id,
                        debit.c.address.label("debit"),
                        credit.c.address.label("credit"),
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
                (r.transfer_id, r.address, r.side): (int(r.posted), int(r.pending))
                for r in connection.execute(
                    select(
                        postings_t.c.transfer_id,
                        account.c.address,
                        postings_t.c.side,
                        func.sum(postings_t.c.posted).label("posted"),
                        func.sum(postings_t.c.pending).label("pending"),
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
                str(r.envelope_id): int(r.seq)
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


# --- the in-memory replay (``ubc audit verify``) ------------------------------------------

CHUNK = 1000
#: An export's lines go to the workers as byte ranges of about this size (some 1,000
#: entries of a journal of transfers).
CHUNK_BYTES = 1 << 20
# Chunks sent ahead per worker: enough to keep them busy, few enough to keep memory flat.
AHEAD = 3


class _Frontier:
    """The Merkle tree's right edge: O(log n) hashes, one leaf at a time."""

    def __init__(self) -> None:
        self.size = 0
        self.stack: list[bytes] = []

    def push(self, leaf: bytes) -> None:
        size, stack, digest = self.size, self.stack, leaf
        while size & 1:
            digest = node_hash(stack.pop(), digest)
            size >>= 1
        stack.append(digest)
        self.size += 1


class _MemoryReplayer:
    """The journal re-run through the same rules into :class:`MemoryState`, with decoding
    and signature checks in worker processes and everything else here, in order."""

    def __init__(
        self, verifier: NoteVerifier, report: Report, *, keep_rows: bool, expected: int = 0
    ) -> None:
        self.verifier = verifier
        self.report = report
        # Envelope ids: sized for the journal's announced size (bounded: it is untrusted).
        ids = IdTable(min(max(expected, 0), 1 << 26))
        self.state = MemoryState(keep_rows=keep_rows, ids=ids)
        self.ctx: envelopes.LedgerContext | None = None
        self.failed: dict[int, tuple[int, UbcError]] = {}
        self.group_at = ""
        self.group_size = 0
        self.now: datetime | None = None
        # What the journal recorded of the entry being applied, for the rules that read
        # it; one context per group of entries (the server's batch).
        self.record = _Record("", [], None)
        self.rule_ctx: RuleContext | None = None
        self.ledger_keyid = ""
        # Signers of one member's key (immutable): one per (handle, current).
        self.signers: dict[tuple[str, bool], Signers] = {}

    def run(
        self,
        journal: Journal,
        checkpoint: Checkpoint | None,
        old: Checkpoint | None,
        progress: ProgressFn | None,
    ) -> None:
        findings = self.report.findings
        tree = _Frontier()
        # Sizes at which the root is checked, and from where entries are unsigned.
        watched = {c.size for c in (checkpoint, old) if c is not None}
        signed = checkpoint.size if checkpoint is not None else None
        chunks: Iterator[workers.Chunk]
        if journal.export is not None:
            # An export's lines go to the workers as byte ranges, read and decoded there.
            path = journal.export
            head = next(export_blocks(path, 1), None)
            first = None if head is None else parse_export_line(head[1], path, head[0])
            chunks = (
                (str(path), number, offset, length)
                for number, offset, length in export_ranges(path, CHUNK_BYTES, skip=1)
            )
        else:
            first = next(journal.entries, None)
            chunks = _chunked(journal.entries, CHUNK)
        if first is not None:
            # Entry 0 here: the genesis sets the context every other entry is read in.
            tree.push(leaf_hash(first[1]))
            if 1 in watched or (signed is not None and 1 > signed):
                _check_position(findings, 1, tree.stack, checkpoint, old, self.report)
            self._first(first[0], first[1])
        pool = workers.Pool()
        # As in the workers: reference counting frees what an entry allocates, and the
        # cycle collector runs once per GC_EVERY chunks instead of rescanning the state.
        gc.freeze()
        gc.disable()
        chunks_done = 0
        try:
            ahead = AHEAD * len(pool.processes)
            more = True
            while True:
                while more and pool.waiting < ahead:
                    chunk = next(chunks, None)
                    if chunk is None:
                        more = False
                        break
                    pool.send(self.state.new_keys, chunk)
                if not pool.waiting:
                    break
                items = pool.receive()
                for label, leaf, fields in items:
                    tree.push(leaf)
                    position = tree.size
                    if position in watched or (signed is not None and position > signed):
                        _check_position(
                            findings, position, tree.stack, checkpoint, old, self.report
                        )
                    self._entry(position - 1, label, fields)
                if progress is not None:
                    progress(len(items))
                chunks_done += 1
                if chunks_done % workers.GC_EVERY == 0:
                    gc.collect()
        finally:
            pool.close()
            gc.enable()
            gc.unfreeze()
        self.report.entries = tree.size
        _check_end(findings, tree.size, checkpoint, old)

    def _first(self, label: int, entry: bytes) -> None:
        findings = self.report.findings
        try:
            body = json.loads(entry)
            recorded_seq = body["seq"]
            envelope_json = body["envelope"]
            effects = body["effects"]
            body["committed_at"]
        except (ValueError, KeyError, TypeError) as exc:
            findings.append(Finding(0, "entry.format", "a journal entry", str(exc)))
            return
        if recorded_seq != 0 or label != 0:
            findings.append(
                Finding(
                    0,
                    "journal.sequence",
                    "entry 0",
                    f"entry labelled {label} recording seq {recorded_seq}",
                )
            )
        self._genesis(envelope_json, effects)

    def _entry(self, seq: int, label: int, fields: Any) -> None:
        findings = self.report.findings
        if fields[0] == "error":
            findings.append(Finding(seq, "entry.format", "a journal entry", fields[1]))
            return
        recorded_seq = fields[0]
        if recorded_seq != seq or label != seq:
            findings.append(
                Finding(
                    seq,
                    "journal.sequence",
                    f"entry {seq}",
                    f"entry labelled {label} recording seq {recorded_seq}",
                )
            )
        if self.ctx is None:
            findings.append(Finding(seq, "journal.genesis", "a genesis entry first", "none"))
            return
        _, committed_at, effects, summary, kind, decoded = fields
        if committed_at != self.group_at or self.group_size >= REPLAY_BATCH:
            # The server's batches: what one planned (refs, spend) counts for the next.
            self.state.new_group()
            self.group_at, self.group_size = committed_at, 0
            self.now = parse_timestamp(committed_at)
        self.group_size += 1
        assert self.now is not None
        outcome = self._apply(decoded, effects, summary, self.now)
        if isinstance(outcome, UbcError):
            findings.append(
                Finding(
                    seq,
                    f"envelope.{kind}",
                    "accepted under the ledger's rules",
                    f"{outcome.status_code} {outcome.error_type}: {outcome.message}",
                )
            )
            return
        if outcome is None:
            findings.append(
                Finding(
                    seq,
                    "journal.duplicate",
                    "each envelope journaled once",
                    f"envelope {decoded[1].id} again",
                )
            )
            return
        derived, derived_summary = outcome
        if derived_summary != summary:
            findings.append(
                Finding(
                    seq,
                    f"summary.{kind}",
                    json.dumps(derived_summary, sort_keys=True),
                    json.dumps(summary, sort_keys=True),
                )
            )
        if effects_differ(derived, effects):
            findings.append(
                Finding(
                    seq,
                    f"effects.{kind}",
                    json.dumps([e.to_json() for e in derived], sort_keys=True),
                    json.dumps(workers.effects_json(effects), sort_keys=True),
                )
            )

    def _apply(
        self,
        decoded: workers.Decoded | UbcError,
        effects: Any,
        summary: Any,
        now: datetime,
    ) -> tuple[list[Effect], dict[str, Any] | None] | UbcError | None:
        """The write path's steps for one envelope (``ubc.envelopes.service._Writer._one``
        in a re-run), on the in-memory state: (effects, summary), an error, or None for
        a repeat of an accepted envelope."""
        if isinstance(decoded, UbcError):
            return decoded
        ctx, state = self.ctx, self.state
        assert ctx is not None
        type_, payload, fingerprint, payload_type, body, sigs, hashed, verified = decoded
        value = fingerprint_value(fingerprint)
        earlier = state.ids.get_hash(hashed)
        failed = self.failed.get(hashed)
        if failed is not None and failed[0] == value:
            return failed[1]
        if earlier is not None and earlier == value and failed is None:
            return None
        signers = self._member_signer(payload, sigs, verified)
        if signers is None:
            envelope = Envelope(payload_type, body, tuple(Signature(k, sig) for k, sig in sigs))
            try:
                if payload.ledger != ctx.origin:
                    raise InvalidPayload(
                        f"envelope is for ledger {payload.ledger!r}, this is {ctx.origin!r}",
                        detail={"ledger": payload.ledger, "expected": ctx.origin},
                    )
                signers = authenticate(
                    state,
                    envelope,
                    payload,
                    operator_keys=ctx.operator_keys,
                    ledger_public_key=ctx.ledger_public_key,
                    preverified=frozenset(verified),
                )
            except UbcError as error:
                return error
        if earlier is not None or failed is not None:
            return IdempotencyConflict(
                f"id {payload.id} was already used with a different payload",
                detail={"id": payload.id},
            )
        record = self.record
        record.envelope_id, record.effects, record.summary = payload.id, effects, summary
        rule_ctx = self.rule_ctx
        if rule_ctx is None or rule_ctx.now is not now:
            rule_ctx = self.rule_ctx = RuleContext(
                now=now,
                enrollment=ctx.enrollment,
                assets=ctx.assets,
                recorded=record,
                allocate_at_once=None,
            )
        try:
            plan = REGISTRY.plan(state, rule_ctx, type_, payload, signers, internal=True)
        except MissingSignature as error:
            return error
        except UbcError as error:
            return self._fail(hashed, fingerprint, error)
        state.planned(plan)
        for hold in plan.holds:
            placed = state.apply_request(
                hold.request_id, (hold.leg,), operations_fingerprint((hold.leg,)), hold.at
            )
            if isinstance(placed, UbcError):
                return self._fail(hashed, fingerprint, placed)
        derived_summary = None
        derived: list[Effect] = []
        if plan.operations:
            applied = state.apply_request(
                payload.id, plan.operations, fingerprint, now, id_hash=hashed, new=True
            )
            if isinstance(applied, UbcError):
                return self._fail(hashed, fingerprint, applied, remembered=True)
            derived = applied
        try:
            for change in plan.changes:
                written = state.apply_change(change, now)
                if written is not None:
                    derived_summary = written
        except UbcError as error:
            return self._fail(hashed, fingerprint, error)
        if not plan.operations:
            state.ids.put_hash(hashed, fingerprint)
        return derived, derived_summary

    def _member_signer(
        self, payload: Any, sigs: tuple[tuple[str, bytes], ...], verified: tuple[str, ...]
    ) -> Signers | None:
        """What :func:`ubc.rules.authenticate` returns for the common envelope, computed
        without it: one signature, verified by a worker, by a key of a member (not the
        ledger's nor an operator's), on a payload for this ledger that introduces no key.
        None for every other envelope: ``authenticate`` decides those."""
        ctx = self.ctx
        assert ctx is not None
        if len(sigs) != 1 or len(verified) != 1 or payload.ledger != ctx.origin:
            return None
        keyid = verified[0]
        if keyid != sigs[0][0] or keyid == self.ledger_keyid or keyid in ctx.operator_keys:
            return None
        fields = payload.__dict__
        if isinstance(fields.get("public_key"), str) or isinstance(
            fields.get("new_public_key"), str
        ):
            return None
        info = self.state.keys.get(keyid)
        if info is None:
            return None
        cached = self.signers.get((info.handle, info.current))
        if cached is None:
            handles = frozenset((info.handle,))
            cached = self.signers[(info.handle, info.current)] = (
                Signers(current=handles) if info.current else Signers(rotated=handles)
            )
        return cached

    def _fail(
        self, hashed: int, fingerprint: bytes, error: UbcError, *, remembered: bool = False
    ) -> UbcError:
        if not remembered:
            self.state.ids.put_hash(hashed, fingerprint)
        self.failed[hashed] = (fingerprint_value(fingerprint), error)
        return error

    def _genesis(self, envelope_json: Any, effects: Any) -> None:
        checked = check_genesis(envelope_json, effects, self.verifier, self.report.findings)
        if checked is None:
            return
        envelope, payload = checked
        self.ctx = envelopes.context_from_genesis(payload, skew=timedelta(days=36500))
        self.ledger_keyid = self.ctx.ledger_keyid
        self.state.genesis(payload.id, payload_json(payload))
        self.state.ids.put(payload.id, hashlib.sha256(envelope.payload).digest())
        self.state.new_keys.append((self.ctx.ledger_keyid, self.ctx.ledger_public_key))
        self.state.new_keys.extend(self.ctx.operator_keys.items())

    def check_invariants(self) -> None:
        sums, negative = self.state.invariants()
        for asset, (posted, pending) in sums.items():
            if posted != 0 or pending != 0:
                self.report.findings.append(
                    Finding(
                        None,
                        "double_entry",
                        f"{asset} balances sum to 0",
                        f"posted {posted}, pending {pending}",
                    )
                )
        for address, asset in negative:
            self.report.findings.append(
                Finding(None, "non_negative", f"{address} {asset} ≥ 0", "below zero")
            )


def effects_differ(derived: list[Effect], recorded: Any) -> bool:
    """Whether derived effects differ from recorded ones as JSON values (as the write path
    compares them); recorded effects come as a tuple of ``Effect`` when each was exactly
    an effect's object (:func:`ubc.audit.workers.compact_effects`)."""
    if type(recorded) is tuple and derived:
        return tuple(derived) != recorded
    return bool([e.to_json() for e in derived] != recorded)


class _Record(Mapping[str, Recorded]):
    """What the journal recorded of one entry, for the rules that read it (decoded only
    when one does)."""

    __slots__ = ("envelope_id", "effects", "summary")

    def __init__(self, envelope_id: str, effects: Any, summary: Any) -> None:
        self.envelope_id = envelope_id
        self.effects = effects
        self.summary = summary

    def __getitem__(self, key: str) -> Recorded:
        if key != self.envelope_id:
            raise KeyError(key)
        effects = workers.effects_json(self.effects)
        return Recorded(
            tuple(effects) if isinstance(effects, list) else (),
            self.summary if isinstance(self.summary, dict) else None,
        )

    def __iter__(self) -> Iterator[str]:
        return iter((self.envelope_id,))

    def __len__(self) -> int:
        return 1


def _chunked(entries: Iterator[tuple[int, bytes]], size: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    for item in entries:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_genesis(
    envelope_json: Any, effects: Any, verifier: NoteVerifier, findings: list[Finding]
) -> tuple[Envelope, LedgerGenesis] | None:
    """Entry 0 as both engines check it: a ledger.genesis signed by the vkey's key, for
    the vkey's origin, with no effects. None (and a finding) when it cannot be used."""
    try:
        envelope = Envelope.from_json(envelope_json)
        payload = validate_payload("ledger.genesis", parse_payload(envelope.payload))
    except (EnvelopeFormatError, ValueError) as exc:
        findings.append(Finding(0, "genesis.format", "a ledger.genesis envelope", str(exc)))
        return None
    public = verifier.public_key
    if not verified_keyids(envelope, {key_id(public): public}):
        findings.append(
            Finding(
                0,
                "genesis.signature",
                "signed by the ledger key of the vkey",
                "no valid ledger signature",
            )
        )
        return None
    assert isinstance(payload, LedgerGenesis)
    if payload.ledger != verifier.name:
        findings.append(Finding(0, "genesis.origin", verifier.name, payload.ledger))
    if effects != []:
        findings.append(Finding(0, "genesis.effects", "[]", json.dumps(effects)))
    return envelope, payload
