"""Bearer authentication for reads: operator and auditor tokens, and members' API keys.

The members' API keys are the members' own tables: looking one up is
:func:`ubc.members.auth.api_key_principal`, which the application (``ubc.app``) hands to
the read routes (``app.state.api_key_principal``). This module stays below the domains,
so that any domain's routes may authenticate a reader without importing ``ubc.members``
(which itself uses the ledger: the other way round would be a cycle).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy.orm import Session

from ubc.errors import Unauthenticated


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is reading: ``operator``, ``auditor``, or the account of an API key."""

    role: str
    account: str | None = None
    key_hash: str | None = None
    scopes: frozenset[str] = frozenset()

    @property
    def sees_everything(self) -> bool:
        return self.role in ("operator", "auditor")

    def may_read(self, address: str) -> bool:
        return self.sees_everything or (self.account == address and "read" in self.scopes)


class ApiKeyPrincipal(Protocol):
    """The principal of a member's API key (401 when unknown, revoked or expired)."""

    def __call__(self, session: Session, secret: str, *, now: datetime) -> Principal: ...


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def authenticate_bearer(
    session: Session,
    authorization: str | None,
    *,
    tokens: dict[str, str],
    now: datetime,
    api_keys: ApiKeyPrincipal,
) -> Principal:
    """The principal of an ``Authorization: Bearer ...`` header (tokens: role → token;
    any other secret is looked up as an API key through ``api_keys``)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthenticated("a bearer token or API key is required")
    secret = authorization[7:].strip()
    for role, token in tokens.items():
        if token and hmac.compare_digest(secret.encode(), token.encode()):
            return Principal(role)
    return api_keys(session, secret, now=now)
