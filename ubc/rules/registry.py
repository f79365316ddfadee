"""The registry interface: which rule and schema serve a payload type, which writer a change.

The registry itself sits above the domains (``ubc.envelopes.registry``): each domain
exports its :class:`RuleSpec` list and its change writers, and the registry joins them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from ubc.errors import Forbidden
from ubc.rules.context import RuleContext
from ubc.rules.effects import Change, Plan
from ubc.rules.payload import Payload
from ubc.rules.signers import Signers

#: A rule: the lookup (the domain's Protocol), the context, the payload and who signed.
Rule = Callable[[Any, RuleContext, Any, Signers], Plan]
#: Carries one change out; an epoch's returns the summary its journal entry carries.
Writer = Callable[[Session, Any, datetime], Mapping[str, Any] | None]
#: Carries out every change of one type a batch made, once the batch has applied.
BatchWriter = Callable[[Session, list[Any]], None]


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A payload type: its schema, its rule, and who may submit it.

    ``submit`` is ``client`` (anyone may submit it), ``ledger`` (only the ledger's own
    envelopes and re-runs of its journal carry it) or ``genesis`` (entry 0 only, never
    through the write path).
    """

    name: str
    model: type[Payload]
    rule: Rule | None
    submit: str = "client"


@dataclass(frozen=True, slots=True)
class WriterSpec:
    """How a change type is carried out: at once, or with its kind once per batch."""

    change: type[Change]
    write: Writer | None = None
    write_batch: BatchWriter | None = None


class Registry:
    """Payload types to rules and schemas, change types to writers."""

    def __init__(self, specs: Iterable[RuleSpec], writers: Iterable[WriterSpec]) -> None:
        self.specs: dict[str, RuleSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"payload type {spec.name} registered twice")
            self.specs[spec.name] = spec
        self.writers: dict[type[Change], WriterSpec] = {w.change: w for w in writers}
        self.models = {name: spec.model for name, spec in self.specs.items()}
        self.submittable = frozenset(n for n, s in self.specs.items() if s.submit == "client")
        self.ledger_only = frozenset(n for n, s in self.specs.items() if s.submit != "client")

    def plan(
        self,
        look: Any,
        ctx: RuleContext,
        type_: str,
        payload: Payload,
        signers: Signers,
        *,
        internal: bool,
    ) -> Plan:
        """Authorize the signers for ``payload`` and derive what it does.

        ``internal`` admits the ledger-only types (the server's own envelopes and re-runs
        of its journal); genesis never comes this way.
        """
        spec = self.specs[type_]
        if spec.rule is None or (spec.submit == "ledger" and not internal):
            raise Forbidden(f"{type_} envelopes are written only by the ledger itself")
        return spec.rule(look, ctx, payload, signers)

    def writer(self, change: Change) -> WriterSpec:
        return self.writers[type(change)]
