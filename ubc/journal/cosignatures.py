"""The witnesses' cosignatures the ledger collected, and where its witnesses stand.

The ledger asks its witnesses (``UBC_WITNESSES``) to cosign its checkpoints
(``ubc.witness.cosigning`` runs the rounds); what they answered is kept here, in three
tables of the ledger's schema:

- ``journal_cosignatures``: one verified cosignature line per (tree size, witness), with
  the ledger-signed checkpoint it is on. ``GET /journal/checkpoint`` appends the lines of
  the latest checkpoint's size; ``GET /journal/checkpoint/cosigned`` serves the largest
  checkpoint a quorum cosigned. Rows below that size are pruned after each round.
- ``journal_witnesses``: per witness, its size as last known (what the next request
  sends as ``old``), the largest size it cosigned, and the outcome of the last attempt.
- ``journal_witness_rounds``: one row, when the latest round started (the ledger's
  clock): at most one round per ``UBC_WITNESS_INTERVAL_SECONDS``, whatever the number of
  processes.

Witnesses are named here by their vkey (``<name>+<key ID>+<key>``): the route layer only
reads rows, it never parses or verifies a cosignature (that is done before a row is
written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, String, Text, func, select
from sqlalchemy.orm import Session
from sqlmodel import Field, SQLModel

from ubc.db import table
from ubc.dbtypes import UTCDateTime


class JournalCosignature(SQLModel, table=True):
    """A witness's verified cosignature on the ledger's checkpoint of ``size`` entries."""

    __tablename__ = "journal_cosignatures"

    size: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    witness: str = Field(sa_column=Column(String(1024), primary_key=True))
    # The ledger-signed checkpoint note (no cosignature) the line is on.
    checkpoint: str = Field(sa_column=Column(Text, nullable=False))
    # The signature line, without its newline: "— <name> <base64>".
    line: str = Field(sa_column=Column(Text, nullable=False))
    # The cosignature's own timestamp (seconds since the epoch, as the witness signed it).
    timestamp: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class JournalWitness(SQLModel, table=True):
    """Where one witness stands, as the ledger last learned it."""

    __tablename__ = "journal_witnesses"

    witness: str = Field(sa_column=Column(String(1024), primary_key=True))
    # The witness's size for this log (what the next add-checkpoint sends as ``old``):
    # from its 200 (the size it cosigned) or its 409 (the size it said it has).
    size: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    cosigned_size: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    attempted_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    succeeded_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    # "cosigned", or what went wrong: "timeout", "unreachable", "http_<status>",
    # "bad_cosignature", "ahead" (the witness is beyond the ledger's size), "conflict".
    status: str = Field(default="", sa_column=Column(String(32), nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class JournalWitnessRound(SQLModel, table=True):
    """One row (id 1): when the latest witness round started, on the ledger's clock."""

    __tablename__ = "journal_witness_rounds"

    id: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    started_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


cosignatures_t = table(JournalCosignature)
witnesses_t = table(JournalWitness)
rounds_t = table(JournalWitnessRound)


@dataclass(frozen=True)
class WitnessInfo:
    """A configured witness as the routes show it (its URL without any credentials)."""

    name: str
    vkey: str
    url: str


@dataclass(frozen=True)
class Witnessing:
    """The ledger's witness configuration as the routes need it (``app.state.witnessing``)."""

    witnesses: tuple[WitnessInfo, ...]
    quorum: int
    interval_seconds: float

    @property
    def vkeys(self) -> tuple[str, ...]:
        return tuple(w.vkey for w in self.witnesses)


def body_of(note: str) -> str:
    """A signed note's body (with its final newline), without the signature lines."""
    split = note.find("\n\n")
    return note[: split + 1] if split >= 0 else note


def cosigned_lines(
    session: Session, size: int, checkpoint: str, vkeys: Sequence[str]
) -> dict[str, str]:
    """The stored cosignature line (without its newline) of each given witness that
    cosigned ``checkpoint`` (a ledger-signed note of ``size`` entries), by vkey."""
    if not vkeys or not checkpoint:
        return {}
    rows = session.execute(
        select(cosignatures_t.c.witness, cosignatures_t.c.checkpoint, cosignatures_t.c.line).where(
            cosignatures_t.c.size == size, cosignatures_t.c.witness.in_(list(vkeys))
        )
    ).all()
    body = body_of(checkpoint)
    return {str(r.witness): str(r.line) for r in rows if body_of(str(r.checkpoint)) == body}


def lines_for(session: Session, size: int, checkpoint: str, vkeys: Sequence[str]) -> list[str]:
    """The stored cosignature lines (each with its newline) of the given witnesses on
    ``checkpoint``, in the order of ``vkeys``."""
    found = cosigned_lines(session, size, checkpoint, vkeys)
    return [found[vkey] + "\n" for vkey in vkeys if vkey in found]


def with_cosignatures(session: Session, size: int, checkpoint: str, vkeys: Sequence[str]) -> str:
    """``checkpoint`` with the cosignature lines collected for it appended."""
    return checkpoint + "".join(lines_for(session, size, checkpoint, vkeys))


def witnessed_size(session: Session, vkeys: Sequence[str], quorum: int) -> int | None:
    """The largest size that at least ``quorum`` of the given witnesses cosigned."""
    if not vkeys:
        return None
    size = session.execute(
        select(cosignatures_t.c.size)
        .where(cosignatures_t.c.witness.in_(list(vkeys)))
        .group_by(cosignatures_t.c.size)
        .having(func.count() >= quorum)
        .order_by(cosignatures_t.c.size.desc())
        .limit(1)
    ).scalar()
    return None if size is None else int(size)


def witnessed_checkpoint(session: Session, witnessing: Witnessing) -> tuple[int, str] | None:
    """The largest checkpoint a quorum cosigned, with every stored cosignature on it."""
    size = witnessed_size(session, witnessing.vkeys, witnessing.quorum)
    if size is None:
        return None
    rows = session.execute(
        select(cosignatures_t.c.witness, cosignatures_t.c.checkpoint).where(
            cosignatures_t.c.size == size,
            cosignatures_t.c.witness.in_(list(witnessing.vkeys)),
        )
    ).all()
    # Every row of one size is on the same checkpoint (the ledger signs one tree per size
    # deterministically); the first configured witness's is taken.
    by_witness = {str(r.witness): str(r.checkpoint) for r in rows}
    checkpoint = next(by_witness[v] for v in witnessing.vkeys if v in by_witness)
    return size, with_cosignatures(session, size, checkpoint, witnessing.vkeys)


def witness_rows(session: Session, vkeys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The status rows of the given witnesses, by vkey."""
    if not vkeys:
        return {}
    rows = session.execute(select(witnesses_t).where(witnesses_t.c.witness.in_(list(vkeys))))
    return {str(r.witness): dict(r._mapping) for r in rows}


def latest_round(session: Session) -> datetime | None:
    value = session.execute(select(rounds_t.c.started_at).where(rounds_t.c.id == 1)).scalar()
    return value if isinstance(value, datetime) else None
