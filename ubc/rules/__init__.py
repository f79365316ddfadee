"""The rules kernel: the context, signer checks, plans and effects, the registry interface.

Below every domain: each domain's ``rules.py`` builds on it, the write path
(``ubc.envelopes``) applies what the rules return, the auditor re-runs the same rules.
It imports nothing of ubc but signing, errors and SQLAlchemy's Session type.
"""

import uuid

from ubc.rules.context import Recorded, RuleContext
from ubc.rules.effects import Change, HoldPlacement, Leg, Operation, Plan, Post, Void
from ubc.rules.lookup import KeyInfo, Lookup, MemberInfo
from ubc.rules.registry import Registry, Rule, RuleSpec, WriterSpec
from ubc.rules.signers import (
    Signers,
    active_member,
    actor_handle,
    authenticate,
    member_signer,
    require_ledger,
    require_operator,
    require_own_account,
    require_status,
    require_steward,
)


def new_id() -> str:
    return str(uuid.uuid4())


__all__ = [
    "Change",
    "HoldPlacement",
    "KeyInfo",
    "Leg",
    "Lookup",
    "MemberInfo",
    "Operation",
    "Plan",
    "Post",
    "Recorded",
    "Registry",
    "Rule",
    "RuleContext",
    "RuleSpec",
    "Signers",
    "Void",
    "WriterSpec",
    "active_member",
    "actor_handle",
    "authenticate",
    "member_signer",
    "new_id",
    "require_ledger",
    "require_operator",
    "require_own_account",
    "require_status",
    "require_steward",
]
