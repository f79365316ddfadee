"""The journal in the database: append a batch of entries under one lock, read them back.

Every accepted envelope becomes one entry, appended in the same transaction as its
postings. Writers lock the single ``journal_head`` row once per batch (group commit),
which makes sequence numbers gapless under concurrent writers: a rolled-back batch
never consumed any.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ubc.db import on_postgresql, table
from ubc.db.driver import COPY_THRESHOLD, Driver
from ubc.db.driver import defer as defer_statements
from ubc.journal.checkpoint import format_checkpoint
from ubc.journal.merkle import (
    EMPTY_ROOT,
    NodeID,
    append_leaves,
    frontier_ids,
    leaf_hash,
    root_from_frontier,
)
from ubc.journal.models import JournalEntry, JournalHead, MerkleNode
from ubc.rules.payload import format_timestamp
from ubc.signing import NoteSigner

entries_t = table(JournalEntry)
nodes_t = table(MerkleNode)
head_t = table(JournalHead)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """What an accepted envelope contributes to the journal."""

    envelope_id: str
    type: str
    actor: str
    envelope: dict[str, Any]
    effects: list[dict[str, Any]]
    accounts: frozenset[str]
    summary: dict[str, Any] | None = None


def lock_head(session: Session) -> int | None:
    """Lock the journal for this transaction; the current size, or None before genesis."""
    row = lock_head_with(session)
    if row is None:
        return None
    (size,) = row
    return int(size)


def lock_head_with(session: Session, *extra: Any) -> tuple[Any, ...] | None:
    """Lock the journal head and read ``extra`` scalar subqueries with it: the size first."""
    row = session.execute(head_statement(session, *extra)).first()
    return None if row is None else tuple(row)


def head_statement(session: Session, *extra: Any) -> Any:
    """The statement that locks the journal head and reads ``extra`` with its size."""
    stmt = select(head_t.c.size, *extra).where(head_t.c.id == 1)
    if on_postgresql(session):
        stmt = stmt.with_for_update(of=head_t)
    return stmt


@dataclass(frozen=True, slots=True)
class LockedHead:
    """The journal head as locked for a batch, and what was read with it."""

    row: tuple[Any, ...]
    reads: list[list[Any]]


def lock_head_and_read(
    session: Session, head_sql: str, reads: Sequence[tuple[str, Sequence[Any]]]
) -> LockedHead | None:
    """Lock the journal head with ``head_sql`` (a compiled :func:`head_statement`), then
    run the statements of ``reads``: on PostgreSQL in the same round trip. The reads run
    once the lock is granted, so they see every batch committed before; None if there is
    no head (no genesis yet)."""
    results = Driver(session).fetch_many([(head_sql, []), *reads])
    if not results[0]:
        return None
    return LockedHead(tuple(results[0][0]), results[1:])


def stored_frontier(size: int, value: bytes | None) -> list[bytes] | None:
    """The frontier the head keeps (its ``frontier`` column) for a tree of ``size``
    leaves, or None if it keeps none (a journal not appended to since it was added)."""
    if value is None:
        return None
    value = bytes(value)
    count = len(frontier_ids(size))
    if len(value) != 32 * count:
        return None
    return [value[i * 32 : (i + 1) * 32] for i in range(count)]


def create_head(session: Session) -> None:
    """Create the empty journal's head, unless a concurrent start (another worker process of
    the same server) has: that one's genesis is then the journal's, and this one waits for
    it and finds it."""
    dialect = postgresql if on_postgresql(session) else sqlite
    session.execute(
        dialect.insert(head_t).values(id=1, size=0, checkpoint="").on_conflict_do_nothing()
    )


def append(
    session: Session,
    size: int,
    new: Sequence[NewEntry],
    *,
    now: datetime,
    signer: NoteSigner,
    checkpoint: str | None = None,
    frontier: Sequence[bytes] | None = None,
    before: Sequence[tuple[str, Sequence[Any]]] = (),
    defer: bool = False,
) -> list[int]:
    """Append ``new`` after ``size`` entries (the caller holds the head lock); their seqs.

    ``checkpoint`` is the head's checkpoint as read under the lock, if the caller has it:
    the Merkle frontier it names may then come from the cache of the last appends.
    ``frontier``, if given, is the tree's frontier as read under the lock. ``before`` are
    the caller's statements to run first, in the same round trip (PostgreSQL); with
    ``defer`` that round trip is the commit's (:func:`ubc.db.driver.defer`).
    """
    committed_at = format_timestamp(now)
    rows = []
    for offset, item in enumerate(new):
        body: dict[str, Any] = {
            "seq": size + offset,
            "committed_at": committed_at,
            "envelope": item.envelope,
            "effects": item.effects,
        }
        if item.summary is not None:
            # An epoch's effects are derived by the auditor; the entry keeps their summary.
            body["summary"] = item.summary
        entry = encode_entry(body)
        rows.append(RawEntry(item.envelope_id, item.type, item.actor, item.accounts, entry))
    return append_raw(
        session,
        size,
        rows,
        now=now,
        signer=signer,
        current=checkpoint,
        frontier=frontier,
        before=before,
        defer=defer,
    )


def encode_entry(entry: dict[str, Any]) -> bytes:
    """The RFC 8785 (JCS) bytes of a journal entry, on the hot path of every write.

    An entry holds only ASCII strings (the envelope's base64 and hex fields, ids,
    addresses, asset codes, a timestamp) and integers within ±(2^53−1); for such values
    JCS is exactly ``json.dumps`` with sorted keys and no whitespace, which is several
    times faster than the general implementation. ``tests/test_journal_store.py`` checks
    the two agree, and ``canonical_json`` stays the one used for signed payloads.
    """
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True)
class RawEntry:
    envelope_id: str
    type: str
    actor: str
    accounts: frozenset[str]
    entry: bytes


def append_raw(
    session: Session,
    size: int,
    rows: Sequence[RawEntry],
    *,
    now: datetime,
    signer: NoteSigner | None = None,
    checkpoint: str | None = None,
    current: str | None = None,
    frontier: Sequence[bytes] | None = None,
    before: Sequence[tuple[str, Sequence[Any]]] = (),
    defer: bool = False,
) -> list[int]:
    """Store entries' exact bytes and their Merkle nodes, then the new checkpoint.

    The checkpoint is signed by ``signer``, or given (``restore`` keeps the exported one).
    ``current`` is the checkpoint the head holds now (read under the lock): a tree is
    identified by its size and root, so the frontier cached under that checkpoint's body
    is this tree's, and the stored nodes need not be read. ``frontier``, if given, is that
    tree's frontier as read under the lock.

    On PostgreSQL the rows and the head's update go in one round trip (``COPY`` first for
    large batches), after the caller's statements ``before`` (which need PostgreSQL); with
    ``defer``, the round trip of the commit (:func:`ubc.db.driver.defer`).
    """
    driver = Driver(session)
    if not rows:
        if before:
            _send(session, driver, before, defer)
        return []
    if frontier is None or len(frontier) != len(frontier_ids(size)):
        key = _tree_key(current)
        frontier = _FRONTIERS.get(key) if key is not None else None
    if frontier is None or len(frontier) != len(frontier_ids(size)):
        frontier = HashTable(session).get_hashes(frontier_ids(size))
    leaves = [leaf_hash(r.entry) for r in rows]
    nodes, new_frontier = append_leaves(size, frontier, leaves)
    new_size = size + len(rows)
    stamp = driver.timestamp(now)
    entry_rows = [
        (
            size + offset,
            r.envelope_id,
            r.type,
            r.actor,
            " ".join(sorted(r.accounts)),
            r.entry,
            stamp,
        )
        for offset, r in enumerate(rows)
    ]
    if signer is not None:
        root = root_from_frontier(new_size, new_frontier)
        checkpoint = signer.sign(format_checkpoint(signer.name, new_size, root))
    stored = b"".join(new_frontier)
    if driver.postgres:
        statements = list(before)
        for table, columns, table_rows in (
            ("journal_entries", _ENTRY_COLUMNS, entry_rows),
            ("merkle_nodes", _NODE_COLUMNS, nodes),
        ):
            if len(table_rows) >= COPY_THRESHOLD:
                driver.insert(table, columns, table_rows)
            elif table_rows:
                statements.append(driver.insert_statement(table, columns, table_rows))
        statements.append(
            (
                "UPDATE journal_head SET size = %s, checkpoint = %s, frontier = %s WHERE id = 1",
                [new_size, checkpoint or "", stored],
            )
        )
        _send(session, driver, statements, defer)
    else:
        assert not before, "statements sent ahead are PostgreSQL's"
        driver.insert("journal_entries", _ENTRY_COLUMNS, entry_rows)
        driver.insert("merkle_nodes", _NODE_COLUMNS, nodes)
        session.connection().execute(
            update(head_t)
            .where(head_t.c.id == 1)
            .values(size=new_size, checkpoint=checkpoint or "", frontier=stored)
        )
    new_key = _tree_key(checkpoint)
    if new_key is not None:
        if len(_FRONTIERS) >= 64:
            _FRONTIERS.clear()
        # Cached before commit: a rolled-back append leaves a key no head will ever name
        # (the next checkpoint of that size signs another root, or the same tree).
        _FRONTIERS[new_key] = list(new_frontier)
    return list(range(size, new_size))


def _send(
    session: Session, driver: Driver, statements: Sequence[tuple[str, Sequence[Any]]], defer: bool
) -> None:
    if defer:
        defer_statements(session, statements)
    else:
        driver.execute_many(statements)


_ENTRY_COLUMNS = "seq, envelope_id, type, actor, accounts, entry, committed_at"
_NODE_COLUMNS = 'level, "index", hash'

# Merkle frontiers by the checkpoint body (origin, size, root) of the tree they belong to.
_FRONTIERS: dict[str, list[bytes]] = {}


def _tree_key(checkpoint: str | None) -> str | None:
    """The signed part of a checkpoint (origin, size and root): it names one tree."""
    if not checkpoint:
        return None
    body, separator, _ = checkpoint.partition("\n\n")
    return body if separator else None


def set_checkpoint(session: Session, checkpoint: str) -> None:
    session.execute(update(head_t).where(head_t.c.id == 1).values(checkpoint=checkpoint))


def latest_checkpoint(session: Session) -> tuple[int, str]:
    row = session.execute(select(head_t.c.size, head_t.c.checkpoint).where(head_t.c.id == 1)).one()
    return int(row.size), str(row.checkpoint)


def entry_by_envelope(session: Session, envelope_id: str) -> tuple[int, dict[str, Any]] | None:
    row = session.execute(
        select(entries_t.c.seq, entries_t.c.entry).where(entries_t.c.envelope_id == envelope_id)
    ).one_or_none()
    if row is None:
        return None
    return int(row.seq), cast(dict[str, Any], json.loads(bytes(row.entry)))


def entry_bytes(session: Session, seq: int) -> bytes | None:
    value = session.execute(
        select(entries_t.c.entry).where(entries_t.c.seq == seq)
    ).scalar_one_or_none()
    return None if value is None else bytes(value)


def entries(session: Session, start: int, end: int) -> list[tuple[int, bytes, str]]:
    """Entries with start ≤ seq < end: (seq, exact bytes, accounts)."""
    rows = session.execute(
        select(entries_t.c.seq, entries_t.c.entry, entries_t.c.accounts)
        .where(entries_t.c.seq >= start, entries_t.c.seq < end)
        .order_by(entries_t.c.seq)
    ).all()
    return [(int(r.seq), bytes(r.entry), str(r.accounts)) for r in rows]


class HashTable:
    """Stored Merkle node hashes as a :class:`ubc.journal.merkle.HashReader`."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get_hashes(self, ids: Sequence[NodeID]) -> list[bytes]:
        if not ids:
            return []
        by_level: dict[int, list[int]] = {}
        for level, index in ids:
            by_level.setdefault(level, []).append(index)
        # One term per level, so that both engines use the primary key (SQLite scans the
        # whole table for a row-value IN).
        rows = self.session.execute(
            # ``index`` is labelled: a row's ``index`` attribute is the tuple method.
            select(nodes_t.c.level, nodes_t.c.index.label("node_index"), nodes_t.c.hash).where(
                or_(
                    *(
                        and_(nodes_t.c.level == level, nodes_t.c.index.in_(indexes))
                        for level, indexes in sorted(by_level.items())
                    )
                )
            )
        ).all()
        found = {(int(r.level), int(r.node_index)): bytes(r.hash) for r in rows}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"merkle nodes missing: {missing[:5]}")
        return [found[i] for i in ids]


def root(session: Session, size: int) -> bytes:
    if size == 0:
        return EMPTY_ROOT
    reader = HashTable(session)
    return root_from_frontier(size, reader.get_hashes(frontier_ids(size)))
