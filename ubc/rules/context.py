"""What a rule knows besides the payload, its signers and the state it reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a journal entry recorded beyond its envelope: its effects and summary.

    A rule reads it for what the ledger's tables cannot tell because it was never
    journaled: the holds a ``usage`` or ``hold.expire`` entry settled, and the holds that
    limited an ``epoch.close``'s expiries. The server writes new entries and has no record
    to pass; the auditor and ``restore`` pass their journal's.
    """

    effects: tuple[Mapping[str, Any], ...] = ()
    summary: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RuleContext:
    """The ledger's facts and the inputs of one batch.

    ``now`` is the moment the batch applies (the server's clock, or the journal's
    ``committed_at`` in a re-run). ``allocate_at_once`` is how many members an
    ``epoch.open`` allocates in its own transaction (the rest in the background): the
    server bounds it, an auditor's re-run does not.
    """

    now: datetime
    enrollment: str
    assets: tuple[str, ...]
    recorded: Mapping[str, Recorded] = field(default_factory=dict)
    allocate_at_once: int | None = None

    def record_of(self, envelope_id: str) -> Recorded | None:
        return self.recorded.get(envelope_id)
