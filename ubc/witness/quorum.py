"""Requiring witnesses: does a checkpoint carry valid cosignatures from K of N witnesses?

What an auditor or a member checks on a cosigned checkpoint (``ubc audit verify
--witness``, ``ubc proof check --witness``): for each witness it trusts (by vkey), whether
the note carries that witness's cosignature and whether it verifies
(:meth:`CosignatureVerifier.verify`, C2SP ``tlog-cosignature``); the checkpoint is
witnessed when at least ``quorum`` distinct witnesses cosigned it. The ledger's own
signature is not checked here (the caller does it with the ledger's vkey).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ubc.signing.note import NoteError
from ubc.witness.cosignature import CosignatureError, CosignatureMissing, CosignatureVerifier

__all__ = ["WitnessPolicy", "WitnessResult", "WitnessVerdict", "check_witnesses"]

COSIGNED = "cosigned"
MISSING = "missing"
INVALID = "invalid"


@dataclass(frozen=True)
class WitnessPolicy:
    """The witnesses a verifier trusts and how many of them must have cosigned."""

    verifiers: tuple[CosignatureVerifier, ...]
    quorum: int

    @classmethod
    def from_vkeys(cls, vkeys: Sequence[str], quorum: int | None = None) -> WitnessPolicy:
        """Parse witness vkeys (type 0x04); ``quorum`` defaults to all of them.

        Raises :class:`ValueError` (a :class:`CosignatureError` for a bad vkey) when a
        vkey is malformed, when two vkeys share a key (the cosigned message does not name
        the witness, so one key is one witness whatever its names), or when ``quorum`` is
        not between 1 and the number of witnesses.
        """
        if not vkeys:
            raise ValueError("no witness given: a quorum needs at least one witness vkey")
        verifiers: list[CosignatureVerifier] = []
        for vkey in vkeys:
            try:
                verifier = CosignatureVerifier.from_vkey(vkey)
            except NoteError as exc:
                raise CosignatureError(f"witness vkey {vkey!r}: {exc}") from None
            for other in verifiers:
                if other.public_key == verifier.public_key:
                    raise ValueError(
                        f"witnesses {other.vkey} and {verifier.vkey} have the same key: "
                        "one key is one witness"
                    )
            verifiers.append(verifier)
        wanted = len(verifiers) if quorum is None else quorum
        if isinstance(wanted, bool) or not 1 <= wanted <= len(verifiers):
            raise ValueError(
                f"quorum must be between 1 and the number of witnesses given "
                f"({len(verifiers)}), got {quorum}"
            )
        return cls(tuple(verifiers), wanted)

    def check(self, note: str) -> WitnessVerdict:
        return check_witnesses(note, self)


@dataclass(frozen=True)
class WitnessResult:
    """One witness's verdict on a note: ``cosigned`` (with the cosignature's timestamp),
    ``missing`` (no line of its key) or ``invalid`` (a line of its key that does not
    verify, or a note that cannot be read)."""

    name: str
    vkey: str
    status: str
    timestamp: int | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "vkey": self.vkey, "status": self.status}
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    def describe(self) -> str:
        if self.status == COSIGNED:
            return f"{self.name} (cosigned at {self.timestamp})"
        if self.status == MISSING:
            return f"{self.name} (no cosignature)"
        return f"{self.name} (invalid: {self.reason})"


@dataclass(frozen=True)
class WitnessVerdict:
    quorum: int
    results: tuple[WitnessResult, ...]

    @property
    def cosigned(self) -> tuple[WitnessResult, ...]:
        return tuple(r for r in self.results if r.status == COSIGNED)

    @property
    def invalid(self) -> tuple[WitnessResult, ...]:
        return tuple(r for r in self.results if r.status == INVALID)

    @property
    def missing(self) -> tuple[WitnessResult, ...]:
        return tuple(r for r in self.results if r.status == MISSING)

    @property
    def ok(self) -> bool:
        """At least ``quorum`` distinct witnesses cosigned."""
        return len(self.cosigned) >= self.quorum

    def summary(self) -> str:
        """One line for people: who cosigned, who is missing, whose line is invalid."""
        parts = [f"{len(self.cosigned)} of {len(self.results)} witnesses cosigned"]
        for label, group in (
            ("cosigned", self.cosigned),
            ("missing", self.missing),
            ("invalid", self.invalid),
        ):
            if group:
                parts.append(f"{label}: " + ", ".join(r.describe() for r in group))
        return "; ".join(parts)


def check_witnesses(note: str, policy: WitnessPolicy) -> WitnessVerdict:
    """Each trusted witness's verdict on the signed checkpoint ``note``."""
    results = []
    for verifier in policy.verifiers:
        name, vkey = verifier.name, verifier.vkey
        try:
            cosignature = verifier.verify(note)
        except CosignatureMissing:
            results.append(WitnessResult(name, vkey, MISSING))
        except NoteError as exc:  # a line of its key that fails, or a malformed note
            results.append(WitnessResult(name, vkey, INVALID, reason=str(exc)))
        else:
            results.append(WitnessResult(name, vkey, COSIGNED, timestamp=cosignature.timestamp))
    return WitnessVerdict(policy.quorum, tuple(results))
