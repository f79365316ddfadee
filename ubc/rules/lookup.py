"""The narrow read interface rules see the ledger's state through.

The kernel names the reads every domain shares (members, keys, the configuration in
force); each domain declares the reads of its own rules as a Protocol extending
:class:`Lookup` (``ubc.<domain>.rules``), and the write path implements them all over
the database (``ubc.envelopes.lookup``). A lookup answers as the envelopes planned before
in the same batch left the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class MemberInfo:
    handle: str
    status: str
    tier: str | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    keyid: str
    handle: str
    public_key: bytes
    current: bool


class Lookup(Protocol):
    def member(self, handle: str) -> MemberInfo | None:
        """The member, or None."""
        ...

    def key(self, keyid: str) -> KeyInfo | None:
        """A member key by keyid, or None."""
        ...

    def config(self) -> Mapping[str, Any]:
        """The configuration in force (latest genesis or config payload)."""
        ...

    def stewards(self, cause: str) -> frozenset[str] | None:
        """The handles of the stewards of the cause account ``cause``; None if unknown."""
        ...
