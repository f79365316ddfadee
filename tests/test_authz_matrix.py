"""The authorization matrix over real HTTP: who may sign what (DESIGN section 4).

Every submittable payload type is tried with its right signer and with each kind of wrong
one, against one world per database engine: alice (admitted, with a key rotated away, an
API key and funds), bob, carol (suspended) and dave (registered, not admitted). Every
refusal must answer the status of the table in DESIGN section 4 and change nothing:
balances of every account, members, keys, API keys, external refs and the journal size.

The world is shared by the tests of one engine (module scope) because a refusal changes
nothing; the cases that are accepted act on fresh members, so the order does not matter.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from nacl.signing import SigningKey
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tests.conftest import (
    POSTGRES_URL,
    LiveServer,
    _admin_conninfo,
    make_data_dir,
    run_server,
)
from ubc.auth import hash_secret
from ubc.clock import ManualClock
from ubc.db import make_engine
from ubc.envelopes.payloads import MAX_PAYLOAD_BYTES, format_timestamp, validate_payload
from ubc.envelopes.service import sign_payload
from ubc.signing import (
    canonical_json,
    encode_public_key,
    generate_signing_key,
    payload_type_for,
    sign_envelope,
)

ORIGIN = "test.ubc/ledger"
Envelope = dict[str, Any]


# --- building envelopes -------------------------------------------------------------------


def timestamp(offset_seconds: float = 0.0) -> str:
    return format_timestamp(datetime.now(UTC) + timedelta(seconds=offset_seconds))


def public(key: SigningKey) -> str:
    return encode_public_key(bytes(key.verify_key))


def seal(
    type_: str,
    fields: dict[str, Any],
    keys: tuple[SigningKey, ...],
    *,
    ledger: str = ORIGIN,
    id_: str | None = None,
    created_at: str | None = None,
) -> Envelope:
    """The wire envelope of a schema-valid payload, JCS canonical, signed by ``keys``."""
    body = {
        "ledger": ledger,
        "id": id_ or str(uuid.uuid4()),
        "created_at": created_at or timestamp(),
        **fields,
    }
    return sign_payload(validate_payload(type_, body), type_, keys).to_json()


def seal_bytes(type_: str, payload: bytes, keys: tuple[SigningKey, ...]) -> Envelope:
    """An envelope of exactly ``payload`` (no validation), properly signed by ``keys``."""
    return sign_envelope(payload_type_for(type_), payload, keys).to_json()


def payload_of(envelope: Envelope) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return body


def with_payload(envelope: Envelope, body: dict[str, Any]) -> Envelope:
    """The same signatures over other payload bytes: a tampered envelope."""
    return {**envelope, "payload": base64.b64encode(canonical_json(body)).decode()}


def flip_signatures(envelope: Envelope, *, only: int | None = None) -> Envelope:
    signatures = []
    for index, signature in enumerate(envelope["signatures"]):
        if only is None or index == only:
            raw = bytearray(base64.b64decode(signature["sig"]))
            raw[0] ^= 0x01
            signature = {**signature, "sig": base64.b64encode(bytes(raw)).decode()}
        signatures.append(signature)
    return {**envelope, "signatures": signatures}


@dataclass(frozen=True)
class Draft:
    """A payload (without ledger, id and created_at) and the keys that will sign it."""

    type: str
    fields: dict[str, Any]
    keys: tuple[SigningKey, ...]

    def but(self, *, keys: tuple[SigningKey, ...] | None = None, **fields: Any) -> Draft:
        return Draft(self.type, {**self.fields, **fields}, self.keys if keys is None else keys)

    def seal(self, **kwargs: Any) -> Envelope:
        return seal(self.type, self.fields, self.keys, **kwargs)


# --- the world ----------------------------------------------------------------------------

_SNAPSHOT_QUERIES = {
    "accounts": "SELECT address, asset, debits_posted, credits_posted, debits_pending,"
    " credits_pending FROM accounts",
    "members": "SELECT handle, status, tier, display_name FROM members",
    "member_keys": "SELECT keyid, handle, public_key, current FROM member_keys",
    "api_keys": "SELECT key_hash, account, scopes, revoked FROM api_keys",
    "external_refs": "SELECT ref, envelope_id FROM external_refs",
    "transfers": "SELECT id, amount, state FROM transfers",
    "journal_entries": "SELECT seq, envelope_id FROM journal_entries",
}


@dataclass
class World:
    server: LiveServer
    client: httpx.Client
    db: Engine
    operator: SigningKey
    alice: SigningKey = field(default_factory=generate_signing_key)
    alice_old: SigningKey = field(default_factory=generate_signing_key)
    bob: SigningKey = field(default_factory=generate_signing_key)
    carol: SigningKey = field(default_factory=generate_signing_key)
    dave: SigningKey = field(default_factory=generate_signing_key)
    alice_api: str = ""
    alice_revoked_api: str = ""
    carol_api: str = ""
    deposit_ref: str = ""
    _handles: Iterator[int] = field(default_factory=itertools.count)

    def post(self, envelope: object) -> httpx.Response:
        return self.client.post("/api/envelopes", json=envelope)

    def accept(self, envelope: Envelope) -> dict[str, Any]:
        response = self.post(envelope)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def journal_size(self) -> int:
        return int(self.client.get("/journal/checkpoint").text.splitlines()[1])

    def snapshot(self) -> dict[str, Any]:
        """Everything a refusal must leave alone (not ``requests``: authenticated failures
        are remembered by design)."""
        with self.db.connect() as connection:
            state: dict[str, Any] = {
                name: sorted((tuple(row) for row in connection.execute(text(query))), key=repr)
                for name, query in _SNAPSHOT_QUERIES.items()
            }
        state["journal_size"] = self.journal_size()
        return state

    def fresh_handle(self) -> str:
        return f"m{next(self._handles)}-{uuid.uuid4().hex[:8]}"

    def register(self, handle: str, key: SigningKey) -> None:
        fields = {"actor": f"member:{handle}", "handle": handle, "public_key": public(key)}
        self.accept(seal("member.register", fields, (key,)))

    def admit(self, handle: str) -> None:
        fields = {"actor": "operator", "handle": handle, "tier": "basic"}
        self.accept(seal("member.admit", fields, (self.operator,)))

    def fresh_member(self, *, admit: bool = True) -> tuple[str, SigningKey]:
        handle, key = self.fresh_handle(), generate_signing_key()
        self.register(handle, key)
        if admit:
            self.admit(handle)
        return handle, key

    def deposit(self, handle: str, amount: int, ref: str) -> None:
        fields = {
            "actor": "operator",
            "to": f"member:{handle}",
            "asset": "CU",
            "amount": amount,
            "external_ref": ref,
        }
        self.accept(seal("deposit", fields, (self.operator,)))

    def grant(self, handle: str, key: SigningKey) -> str:
        key_hash = hash_secret(f"ubc_{uuid.uuid4().hex}")
        fields = {
            "actor": f"member:{handle}",
            "account": f"member:{handle}",
            "key_hash": key_hash,
            "label": "world",
            "scopes": ["models", "read"],
        }
        self.accept(seal("apikey.grant", fields, (key,)))
        return key_hash

    def revoke(self, handle: str, key: SigningKey, key_hash: str) -> None:
        fields = {"actor": f"member:{handle}", "account": f"member:{handle}", "key_hash": key_hash}
        self.accept(seal("apikey.revoke", fields, (key,)))


def build_world(server: LiveServer, db_url: str) -> World:
    w = World(
        server,
        httpx.Client(base_url=server.url, timeout=30),
        make_engine(db_url, readonly=True),
        server.operator_key,
    )
    # alice registers with a first key and rotates it away
    w.register("alice", w.alice_old)
    w.admit("alice")
    rotate = {"actor": "member:alice", "handle": "alice", "new_public_key": public(w.alice)}
    w.accept(seal("key.rotate", rotate, (w.alice_old, w.alice)))
    for handle, key in (("bob", w.bob), ("carol", w.carol)):
        w.register(handle, key)
        w.admit(handle)
    w.register("dave", w.dave)  # stays pending
    w.deposit_ref = "world-alice"
    w.deposit("alice", 1_000, w.deposit_ref)
    for handle in ("bob", "carol", "dave"):
        w.deposit(handle, 100, f"world-{handle}")
    # a cause whose steward is bob: alice acting for it is a non-steward (403)
    cause = {
        "actor": "operator",
        "slug": "malaria-research",
        "name": "Malaria research",
        "description": "bed nets and vaccines",
        "stewards": ["bob"],
    }
    w.accept(seal("cause.register", cause, (w.operator,)))
    w.alice_api = w.grant("alice", w.alice)
    w.alice_revoked_api = w.grant("alice", w.alice)
    w.revoke("alice", w.alice, w.alice_revoked_api)
    w.carol_api = w.grant("carol", w.carol)
    suspend = {"actor": "operator", "handle": "carol", "status": "suspended", "reason": "test"}
    w.accept(seal("member.update", suspend, (w.operator,)))
    return w


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One served ledger per engine, on its own fresh database, with the world above."""
    tmp = tmp_path_factory.mktemp(f"authz-{request.param}")
    pg_name: str | None = None
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        (tmp / "ubc.db").write_bytes(template.read_bytes())
        db_url = f"sqlite:///{tmp / 'ubc.db'}"
    else:
        template_name: str = request.getfixturevalue("postgres_template")
        pg_name = f"ubc_authz_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}" TEMPLATE "{template_name}"')
        db_url = make_url(POSTGRES_URL).set(database=pg_name).render_as_string(False)
    try:
        with run_server(db_url, make_data_dir(tmp / "data")) as server:
            w = build_world(server, db_url)
            try:
                yield w
            finally:
                w.client.close()
                w.db.dispose()
    finally:
        if pg_name is not None:
            with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


# --- the right signer of each type ----------------------------------------------------------
# Each builds an envelope the ledger accepts, acting on fresh subjects where acceptance
# would change the world the other cases rely on.


def right_register(w: World) -> Draft:
    key, handle = generate_signing_key(), w.fresh_handle()
    fields = {
        "actor": f"member:{handle}",
        "handle": handle,
        "public_key": public(key),
        "display_name": "New Member",
    }
    return Draft("member.register", fields, (key,))


def right_rotate(w: World) -> Draft:
    handle, key = w.fresh_member()
    new = generate_signing_key()
    fields = {"actor": f"member:{handle}", "handle": handle, "new_public_key": public(new)}
    return Draft("key.rotate", fields, (key, new))


def right_grant(w: World) -> Draft:
    fields = {
        "actor": "member:alice",
        "account": "member:alice",
        "key_hash": hash_secret(f"ubc_{uuid.uuid4().hex}"),
        "label": "laptop",
        "scopes": ["models", "read"],
    }
    return Draft("apikey.grant", fields, (w.alice,))


def right_revoke(w: World) -> Draft:
    fields = {
        "actor": "member:alice",
        "account": "member:alice",
        "key_hash": w.grant("alice", w.alice),
    }
    return Draft("apikey.revoke", fields, (w.alice,))


def right_transfer(w: World) -> Draft:
    fields = {
        "actor": "member:alice",
        "from": "member:alice",
        "to": "member:bob",
        "asset": "CU",
        "amount": 1,
        "memo": "matrix",
    }
    return Draft("transfer", fields, (w.alice,))


def right_admit(w: World) -> Draft:
    handle, _ = w.fresh_member(admit=False)
    return Draft(
        "member.admit", {"actor": "operator", "handle": handle, "tier": "basic"}, (w.operator,)
    )


def right_update(w: World) -> Draft:
    handle, _ = w.fresh_member()
    return Draft(
        "member.update", {"actor": "operator", "handle": handle, "tier": "gold"}, (w.operator,)
    )


def right_deposit(w: World) -> Draft:
    fields = {
        "actor": "operator",
        "to": "member:alice",
        "asset": "CU",
        "amount": 5,
        "external_ref": f"dep-{uuid.uuid4().hex}",
    }
    return Draft("deposit", fields, (w.operator,))


def right_withdrawal(w: World) -> Draft:
    fields = {
        "actor": "member:alice",
        "from": "member:alice",
        "asset": "CU",
        "amount": 1,
        "external_ref": f"wd-{uuid.uuid4().hex}",
    }
    return Draft("withdrawal", fields, (w.alice, w.operator))


RIGHT: dict[str, Callable[[World], Draft]] = {
    "member.register": right_register,
    "key.rotate": right_rotate,
    "apikey.grant": right_grant,
    "apikey.revoke": right_revoke,
    "transfer": right_transfer,
    "member.admit": right_admit,
    "member.update": right_update,
    "deposit": right_deposit,
    "withdrawal": right_withdrawal,
}

#: A change to a signed payload that the signature must catch (the attacker's intent).
TAMPER: dict[str, Callable[[World, dict[str, Any]], dict[str, Any]]] = {
    "member.register": lambda w, p: {**p, "display_name": "Mallory"},
    "key.rotate": lambda w, p: {**p, "new_public_key": public(generate_signing_key())},
    "apikey.grant": lambda w, p: {**p, "account": "member:bob"},
    "apikey.revoke": lambda w, p: {**p, "key_hash": w.alice_api},
    "transfer": lambda w, p: {**p, "amount": 999},
    "member.admit": lambda w, p: {**p, "tier": "gold"},
    "member.update": lambda w, p: {**p, "tier": "platinum"},
    "deposit": lambda w, p: {**p, "amount": 1_000_000},
    "withdrawal": lambda w, p: {**p, "amount": 999},
}


# --- the cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    envelope: Envelope
    status: int
    error: str | None = None  # the error type, where the table is that precise


@dataclass(frozen=True)
class Skip:
    reason: str


Case = Callable[[World], Expect] | Skip

#: The cases of the brief, in order; a type may add its own after these.
CASES = [
    "right",
    "replay",
    "duplicate_id",
    "other_member",
    "wrong_role",  # the operator for member types, a member for operator types
    "actor_mismatch",
    "unknown_key",
    "rotated_key",
    "suspended",
    "not_admitted",
    "wrong_origin",
    "stale_past",
    "stale_future",
    "tampered_payload",
    "tampered_signature",
    "unknown_target",
    "conflict",
]


def generic(case: str, type_: str) -> Case | None:
    """The cases that derive from the right envelope in the same way for every type."""
    right = RIGHT[type_]
    stranger = generate_signing_key()
    table: dict[str, Case] = {
        "unknown_key": lambda w: Expect(right(w).but(keys=(stranger,)).seal(), 401),
        "wrong_origin": lambda w: Expect(right(w).seal(ledger="other.ubc/ledger"), 400),
        # A withdrawal may wait days for the operator's countersignature: stale past that.
        "stale_past": lambda w: Expect(
            right(w).seal(created_at=timestamp(-8 * 86400 if type_ == "withdrawal" else -301)),
            400,
        ),
        "stale_future": lambda w: Expect(right(w).seal(created_at=timestamp(301)), 400),
        "tampered_payload": lambda w: Expect(_tampered(w, type_), 401),
        "tampered_signature": lambda w: Expect(flip_signatures(right(w).seal()), 401),
    }
    return table.get(case)


def _tampered(w: World, type_: str) -> Envelope:
    envelope = RIGHT[type_](w).seal()
    return with_payload(envelope, TAMPER[type_](w, payload_of(envelope)))


OPERATOR_TYPE = Skip("an operator type: the signer is the operator, not a member in a state")


def _transfer_cases() -> dict[str, Case]:
    def own(w: World, handle: str, key: SigningKey) -> Envelope:
        return (
            right_transfer(w)
            .but(keys=(key,), actor=f"member:{handle}", **{"from": f"member:{handle}"})
            .seal()
        )

    return {
        "other_member": lambda w: Expect(
            right_transfer(w).but(keys=(w.bob,), actor="member:bob").seal(), 403
        ),
        "wrong_role": lambda w: Expect(
            right_transfer(w).but(keys=(w.operator,), actor="operator").seal(), 403
        ),
        "actor_mismatch": lambda w: Expect(right_transfer(w).but(keys=(w.bob,)).seal(), 403),
        "rotated_key": lambda w: Expect(right_transfer(w).but(keys=(w.alice_old,)).seal(), 403),
        "suspended": lambda w: Expect(own(w, "carol", w.carol), 403),
        "not_admitted": lambda w: Expect(own(w, "dave", w.dave), 403),
        "unknown_target": lambda w: Expect(right_transfer(w).but(to="member:nobody").seal(), 404),
        "conflict": lambda w: Expect(
            right_transfer(w).but(amount=10**12).seal(), 409, "insufficient_funds"
        ),
        "same_account": lambda w: Expect(right_transfer(w).but(to="member:alice").seal(), 400),
    }


def _grant_cases() -> dict[str, Case]:
    def own(w: World, handle: str, key: SigningKey) -> Envelope:
        return (
            right_grant(w)
            .but(keys=(key,), actor=f"member:{handle}", account=f"member:{handle}")
            .seal()
        )

    return {
        "other_member": lambda w: Expect(
            right_grant(w).but(keys=(w.bob,), actor="member:bob").seal(), 403
        ),
        "wrong_role": lambda w: Expect(
            right_grant(w).but(keys=(w.operator,), actor="operator").seal(), 403
        ),
        "actor_mismatch": lambda w: Expect(right_grant(w).but(keys=(w.bob,)).seal(), 403),
        "rotated_key": lambda w: Expect(right_grant(w).but(keys=(w.alice_old,)).seal(), 403),
        "suspended": lambda w: Expect(own(w, "carol", w.carol), 403),
        "not_admitted": lambda w: Expect(own(w, "dave", w.dave), 403),
        "unknown_target": Skip("a grant names the signer's own account (other_member: 403)"),
        "conflict": lambda w: Expect(right_grant(w).but(key_hash=w.alice_api).seal(), 409),
        "cause_account": lambda w: Expect(
            right_grant(w).but(account="cause:malaria-research").seal(), 403
        ),
    }


def _revoke_draft(w: World) -> Draft:
    """Revoking alice's live API key: what every refusal below must not do."""
    fields = {"actor": "member:alice", "account": "member:alice", "key_hash": w.alice_api}
    return Draft("apikey.revoke", fields, (w.alice,))


def _revoke_cases() -> dict[str, Case]:
    return {
        "other_member": lambda w: Expect(
            _revoke_draft(w).but(keys=(w.bob,), actor="member:bob").seal(), 403
        ),
        "wrong_role": lambda w: Expect(
            _revoke_draft(w).but(keys=(w.operator,), actor="operator").seal(), 403
        ),
        "actor_mismatch": lambda w: Expect(_revoke_draft(w).but(keys=(w.bob,)).seal(), 403),
        "rotated_key": lambda w: Expect(_revoke_draft(w).but(keys=(w.alice_old,)).seal(), 403),
        "suspended": lambda w: Expect(
            _revoke_draft(w)
            .but(
                keys=(w.carol,), actor="member:carol", account="member:carol", key_hash=w.carol_api
            )
            .seal(),
            403,
        ),
        "not_admitted": lambda w: Expect(
            _revoke_draft(w).but(keys=(w.dave,), actor="member:dave", account="member:dave").seal(),
            403,
        ),
        "unknown_target": lambda w: Expect(
            _revoke_draft(w).but(key_hash=hash_secret("never granted")).seal(), 404
        ),
        "conflict": lambda w: Expect(
            _revoke_draft(w).but(key_hash=w.alice_revoked_api).seal(), 409, "state_conflict"
        ),
    }


def _alice_rotation(new: SigningKey, *keys: SigningKey) -> Draft:
    fields = {"actor": "member:alice", "handle": "alice", "new_public_key": public(new)}
    return Draft("key.rotate", fields, keys)


def _rotate_cases() -> dict[str, Case]:
    new = generate_signing_key()

    def pending_rotates(w: World) -> Expect:
        # rules._rotate lets a member rotate its key before admission (allow_pending)
        handle, key = w.fresh_member(admit=False)
        fresh = generate_signing_key()
        fields = {"actor": f"member:{handle}", "handle": handle, "new_public_key": public(fresh)}
        return Expect(Draft("key.rotate", fields, (key, fresh)).seal(), 201)

    return {
        "other_member": lambda w: Expect(
            _alice_rotation(new, w.bob, new).but(actor="member:bob").seal(), 403
        ),
        "wrong_role": lambda w: Expect(_alice_rotation(new, w.operator, new).seal(), 403),
        "actor_mismatch": lambda w: Expect(
            _alice_rotation(new, w.alice, new).but(actor="member:bob", handle="bob").seal(), 403
        ),
        "rotated_key": lambda w: Expect(_alice_rotation(new, w.alice_old, new).seal(), 403),
        "suspended": lambda w: Expect(
            _alice_rotation(new, w.carol, new).but(actor="member:carol", handle="carol").seal(),
            403,
        ),
        "not_admitted": pending_rotates,
        "unknown_target": Skip("the handle is the signer's own (other_member: 403)"),
        "conflict": lambda w: Expect(_alice_rotation(w.bob, w.alice, w.bob).seal(), 409),
        "without_new_key": lambda w: Expect(_alice_rotation(new, w.alice).seal(), 403),
    }


def _register_cases() -> dict[str, Case]:
    def with_existing_key(key: SigningKey) -> Callable[[World], Expect]:
        # a key the ledger already knows cannot register a second identity
        def case(w: World) -> Expect:
            return Expect(right_register(w).but(keys=(key,), public_key=public(key)).seal(), 409)

        return case

    return {
        "other_member": lambda w: Expect(right_register(w).but(keys=(w.bob,)).seal(), 403),
        "wrong_role": lambda w: Expect(right_register(w).but(keys=(w.operator,)).seal(), 403),
        "actor_mismatch": lambda w: Expect(right_register(w).but(actor="member:alice").seal(), 403),
        "rotated_key": lambda w: with_existing_key(w.alice_old)(w),
        "suspended": lambda w: with_existing_key(w.carol)(w),
        "not_admitted": lambda w: with_existing_key(w.dave)(w),
        "unknown_target": Skip("a registration creates its subject"),
        "conflict": lambda w: Expect(
            right_register(w).but(actor="member:bob", handle="bob").seal(), 409
        ),
    }


def _admit_draft(w: World, *keys: SigningKey) -> Draft:
    """Admitting dave: what every refusal below must not do."""
    return Draft("member.admit", {"actor": "operator", "handle": "dave", "tier": "basic"}, keys)


def _admit_cases() -> dict[str, Case]:
    return {
        "other_member": OPERATOR_TYPE,
        "wrong_role": lambda w: Expect(
            _admit_draft(w, w.alice).but(actor="member:alice").seal(), 403
        ),
        "actor_mismatch": lambda w: Expect(_admit_draft(w, w.alice).seal(), 403),
        "rotated_key": OPERATOR_TYPE,
        "suspended": OPERATOR_TYPE,
        "not_admitted": lambda w: Expect(_admit_draft(w, w.dave).seal(), 403),  # self-admission
        "unknown_target": lambda w: Expect(
            _admit_draft(w, w.operator).but(handle="nobody").seal(), 404
        ),
        "conflict": lambda w: Expect(
            _admit_draft(w, w.operator).but(handle="bob").seal(), 409, "state_conflict"
        ),
    }


def _update_draft(w: World, *keys: SigningKey) -> Draft:
    """Suspending bob: what every refusal below must not do."""
    fields = {"actor": "operator", "handle": "bob", "status": "suspended"}
    return Draft("member.update", fields, keys)


def _update_cases() -> dict[str, Case]:
    return {
        "other_member": OPERATOR_TYPE,
        "wrong_role": lambda w: Expect(
            _update_draft(w, w.alice).but(actor="member:alice").seal(), 403
        ),
        "actor_mismatch": lambda w: Expect(_update_draft(w, w.alice).seal(), 403),
        "rotated_key": OPERATOR_TYPE,
        "suspended": lambda w: Expect(  # carol reinstates herself
            _update_draft(w, w.carol).but(handle="carol", status="active").seal(), 403
        ),
        "not_admitted": lambda w: Expect(  # dave activates himself
            _update_draft(w, w.dave).but(handle="dave", status="active").seal(), 403
        ),
        "unknown_target": lambda w: Expect(
            _update_draft(w, w.operator).but(handle="nobody").seal(), 404
        ),
        "conflict": lambda w: Expect(
            _update_draft(w, w.operator).but(handle="dave", status="active").seal(),
            409,
            "state_conflict",
        ),
        "nothing_to_change": lambda w: Expect(
            seal("member.update", {"actor": "operator", "handle": "bob"}, (w.operator,)), 400
        ),
    }


def _deposit_cases() -> dict[str, Case]:
    return {
        "other_member": OPERATOR_TYPE,
        "wrong_role": lambda w: Expect(
            right_deposit(w).but(keys=(w.alice,), actor="member:alice").seal(), 403
        ),
        "actor_mismatch": lambda w: Expect(right_deposit(w).but(keys=(w.alice,)).seal(), 403),
        "rotated_key": OPERATOR_TYPE,
        "suspended": OPERATOR_TYPE,
        "not_admitted": OPERATOR_TYPE,
        "unknown_target": lambda w: Expect(right_deposit(w).but(to="member:nobody").seal(), 404),
        "conflict": lambda w: Expect(
            right_deposit(w).but(external_ref=w.deposit_ref).seal(), 409, "idempotency_conflict"
        ),
    }


def _withdrawal_cases() -> dict[str, Case]:
    def own(w: World, handle: str, key: SigningKey) -> Envelope:
        return (
            right_withdrawal(w)
            .but(keys=(key, w.operator), actor=f"member:{handle}", **{"from": f"member:{handle}"})
            .seal()
        )

    return {
        "other_member": lambda w: Expect(
            right_withdrawal(w).but(keys=(w.bob, w.operator), actor="member:bob").seal(), 403
        ),
        "wrong_role": lambda w: Expect(  # the operator alone
            right_withdrawal(w).but(keys=(w.operator,), actor="operator").seal(), 403
        ),
        "actor_mismatch": lambda w: Expect(right_withdrawal(w).but(actor="member:bob").seal(), 403),
        "rotated_key": lambda w: Expect(
            right_withdrawal(w).but(keys=(w.alice_old, w.operator)).seal(), 403
        ),
        "suspended": lambda w: Expect(own(w, "carol", w.carol), 403),
        "not_admitted": lambda w: Expect(own(w, "dave", w.dave), 403),
        "unknown_target": Skip("the owner must sign: an unknown account has no owner key"),
        "conflict": lambda w: Expect(
            right_withdrawal(w).but(amount=10**12).seal(), 409, "insufficient_funds"
        ),
        "owner_only": lambda w: Expect(right_withdrawal(w).but(keys=(w.alice,)).seal(), 403),
        "owner_signature_tampered": lambda w: Expect(
            flip_signatures(right_withdrawal(w).seal(), only=0), 403
        ),
        "external_ref_reused": lambda w: Expect(
            right_withdrawal(w).but(external_ref=w.deposit_ref).seal(),
            409,
            "idempotency_conflict",
        ),
    }


SPECIFIC: dict[str, dict[str, Case]] = {
    "member.register": _register_cases(),
    "key.rotate": _rotate_cases(),
    "apikey.grant": _grant_cases(),
    "apikey.revoke": _revoke_cases(),
    "transfer": _transfer_cases(),
    "member.admit": _admit_cases(),
    "member.update": _update_cases(),
    "deposit": _deposit_cases(),
    "withdrawal": _withdrawal_cases(),
}

#: Where the server answers otherwise than DESIGN section 4: (type, case) -> what it does.
# Cases the server once answered wrongly are listed here as strict xfails until fixed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _matrix() -> list[Any]:
    params = []
    for type_ in RIGHT:
        specific = SPECIFIC[type_]
        for case in [*CASES, *(c for c in specific if c not in CASES)]:
            marks: list[Any] = []
            value = specific.get(case, generic(case, type_))
            if value is None and case not in ("right", "replay", "duplicate_id"):
                raise AssertionError(f"{type_}/{case}: neither a case nor an explicit Skip")
            if isinstance(value, Skip):
                marks.append(pytest.mark.skip(reason=value.reason))
            if (type_, case) in KNOWN_BUGS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[type_, case]))
            params.append(pytest.param(type_, case, id=f"{type_}-{case}", marks=marks))
    return params


def assert_error(response: httpx.Response, status: int, error_type: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message", "detail"}, body
    assert isinstance(body["error"]["message"], str)
    assert isinstance(body["error"]["detail"], dict)
    if error_type is not None:
        assert body["error"]["type"] == error_type, body


@pytest.mark.parametrize(("type_", "case"), _matrix())
def test_authorization_matrix(world: World, type_: str, case: str) -> None:
    if case == "right":
        envelope = RIGHT[type_](world).seal()
        before = world.journal_size()
        response = world.post(envelope)
        assert response.status_code == 201, response.text
        assert response.json()["type"] == type_
        assert response.json()["seq"] == before
        assert world.journal_size() == before + 1
        return
    if case == "replay":
        envelope = RIGHT[type_](world).seal()
        first = world.accept(envelope)
        before = world.snapshot()
        again = world.post(envelope)
        assert again.status_code == 200, again.text
        assert again.json() == first
        assert world.snapshot() == before
        return
    if case == "duplicate_id":
        first = RIGHT[type_](world).seal()
        world.accept(first)
        other = RIGHT[type_](world).seal(id_=payload_of(first)["id"], created_at=timestamp(-1))
        before = world.snapshot()
        assert_error(world.post(other), 409, "idempotency_conflict")
        assert world.snapshot() == before
        return
    value = SPECIFIC[type_].get(case) or generic(case, type_)
    assert callable(value)
    expect = value(world)
    before = world.snapshot()
    response = world.post(expect.envelope)
    if expect.status < 400:
        assert response.status_code == expect.status, response.text
        assert world.journal_size() == before["journal_size"] + 1
        return
    assert_error(response, expect.status, expect.error)
    assert world.snapshot() == before


# --- refusals of the envelope itself ------------------------------------------------------


def _transfer_body(w: World, **changes: Any) -> dict[str, Any]:
    """A valid transfer payload as a dict (ledger, id, created_at included)."""
    body = {"ledger": ORIGIN, "id": str(uuid.uuid4()), "created_at": timestamp()}
    body.update(right_transfer(w).fields)
    body.update(changes)
    return body


def _signed_raw(w: World, raw: bytes) -> Envelope:
    return seal_bytes("transfer", raw, (w.alice,))


def _signed_json(w: World, body: dict[str, Any]) -> Envelope:
    return _signed_raw(w, json.dumps(body).encode())


def _without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


def _duplicate_amount(w: World) -> Envelope:
    raw = json.dumps(_transfer_body(w)).encode()
    assert raw.endswith(b"}")
    return _signed_raw(w, raw[:-1] + b', "amount": 1000}')  # the second amount would win


def _non_canonical_base64(envelope: Envelope) -> Envelope:
    """The same payload bytes spelled with non-zero padding bits (decodes the same)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    raw = base64.b64decode(envelope["payload"])
    raw = raw[:-1] + b" " * ((1 - len(raw)) % 3) + raw[-1:]  # length 1 mod 3: "==" padding
    spelled = base64.b64encode(raw).decode()
    assert spelled.endswith("==")
    last = alphabet[alphabet.index(spelled[-3]) ^ 1]
    return {**envelope, "payload": spelled[:-3] + last + "=="}


def _envelope_with(w: World, **changes: Any) -> Envelope:
    return {**right_transfer(w).seal(), **changes}


#: name -> (body to post: JSON value, or bytes sent as is; the expected error type or None)
MALFORMED: dict[str, Callable[[World], tuple[object, str | None]]] = {
    "body not JSON": lambda w: (b"{not json", "bad_request"),
    "body not UTF-8": lambda w: (b'{"payload": "\xff"}', "bad_request"),
    "body a JSON array": lambda w: ([], "invalid_envelope"),
    "envelope with an unknown field": lambda w: (
        _envelope_with(w, extra="x"),
        "invalid_envelope",
    ),
    "envelope without signatures": lambda w: (_envelope_with(w, signatures=[]), None),
    "signature keyid not hex": lambda w: (
        _envelope_with(w, signatures=[{"keyid": "XYZ", "sig": "AAAA"}]),
        "invalid_envelope",
    ),
    "payload bad base64": lambda w: (_envelope_with(w, payload="!!!not base64"), None),
    "payload non-canonical base64": lambda w: (
        _non_canonical_base64(right_transfer(w).seal()),
        "invalid_envelope",
    ),
    "unknown payloadType": lambda w: (
        {**_signed_json(w, _transfer_body(w)), "payloadType": "application/vnd.ubc.nope+json"},
        "invalid_envelope",
    ),
    "foreign payloadType": lambda w: (
        {**_signed_json(w, _transfer_body(w)), "payloadType": "application/json"},
        "invalid_envelope",
    ),
    "payload not JSON": lambda w: (_signed_raw(w, b"hello"), "invalid_payload"),
    "payload not UTF-8": lambda w: (_signed_raw(w, b'{"a": "\xff"}'), "invalid_payload"),
    "payload a JSON array": lambda w: (_signed_raw(w, b"[]"), "invalid_payload"),
    "float amount": lambda w: (
        _signed_raw(w, json.dumps(_transfer_body(w, amount=1.0)).encode()),
        "invalid_payload",
    ),
    "exponent amount": lambda w: (
        _signed_raw(
            w, json.dumps(_transfer_body(w)).replace('"amount": 1', '"amount": 1e0').encode()
        ),
        "invalid_payload",
    ),
    "duplicate keys": lambda w: (_duplicate_amount(w), "invalid_payload"),
    "unknown field": lambda w: (_signed_json(w, _transfer_body(w, note="x")), "invalid_payload"),
    "missing field": lambda w: (
        _signed_json(w, _without(_transfer_body(w), "asset")),
        "invalid_payload",
    ),
    "amount a string": lambda w: (
        _signed_json(w, _transfer_body(w, amount="1")),
        "invalid_payload",
    ),
    "amount zero": lambda w: (_signed_json(w, _transfer_body(w, amount=0)), "invalid_payload"),
    "amount 2^53": lambda w: (_signed_json(w, _transfer_body(w, amount=2**53)), "invalid_payload"),
    "amount a boolean": lambda w: (
        _signed_json(w, _transfer_body(w, amount=True)),
        "invalid_payload",
    ),
    "bare handle address": lambda w: (
        _signed_json(w, _transfer_body(w, to="bob")),
        "invalid_payload",
    ),
    "memo over 256 characters": lambda w: (
        _signed_json(w, _transfer_body(w, memo="m" * 257)),
        "invalid_payload",
    ),
    "created_at not UTC": lambda w: (
        _signed_json(w, _transfer_body(w, created_at="2026-01-01T12:00:00+01:00")),
        "invalid_payload",
    ),
    "id not a UUID": lambda w: (_signed_json(w, _transfer_body(w, id="tx-1")), "invalid_payload"),
    "id an uppercase UUID": lambda w: (
        _signed_json(w, _transfer_body(w, id=str(uuid.uuid4()).upper())),
        "invalid_payload",
    ),
    "ledger a number": lambda w: (_signed_json(w, _transfer_body(w, ledger=1)), "invalid_payload"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_envelopes_are_400_and_change_nothing(world: World, name: str) -> None:
    body, error_type = MALFORMED[name](world)
    before = world.snapshot()
    if isinstance(body, bytes):
        response = world.client.post(
            "/api/envelopes", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = world.post(body)
    assert_error(response, 400, error_type)
    assert world.snapshot() == before


def test_batch_body_not_json_is_400(world: World) -> None:
    before = world.snapshot()
    response = world.client.post(
        "/api/envelopes/batch", content=b"[1,", headers={"content-type": "application/json"}
    )
    assert_error(response, 400)
    for body in ([], {"envelopes": []}, {"atomic": "yes", "envelopes": [{}]}, {"x": 1}):
        assert_error(world.client.post("/api/envelopes/batch", json=body), 400)
    assert world.snapshot() == before


def test_ledger_only_types_are_refused_even_signed_by_the_ledger_key(world: World) -> None:
    info = world.client.get("/api/ledger").json()
    fields = {
        "actor": "ledger",
        "ledger_public_key": info["ledger_public_key"],
        "operator_public_keys": info["operator_public_keys"],
        "enrollment": "open",
        "assets": info["assets"],
        "market_fee_bps": 0,
        "models": {},
        "cu_price_usd": "0.001",
    }
    ledger_key = world.server.ledger_key
    before = world.snapshot()
    for type_ in ("ledger.genesis", "ledger.config"):
        for keys in ((ledger_key,), (ledger_key, world.operator), (world.operator,)):
            assert_error(world.post(seal(type_, fields, keys)), 403)
    assert world.snapshot() == before
    assert world.client.get("/api/ledger").json()["enrollment"] == "invite"


def test_payload_of_8_kib_is_accepted_and_one_byte_more_is_413(world: World) -> None:
    def padded(size: int) -> bytes:
        raw = canonical_json(_transfer_body(world))
        return b"{" + b" " * (size - len(raw)) + raw[1:]  # JSON whitespace, still valid

    exact = padded(MAX_PAYLOAD_BYTES)
    assert len(exact) == MAX_PAYLOAD_BYTES
    assert world.post(seal_bytes("transfer", exact, (world.alice,))).status_code == 201
    over = padded(MAX_PAYLOAD_BYTES + 1)
    before = world.snapshot()
    assert_error(world.post(seal_bytes("transfer", over, (world.alice,))), 413, "payload_too_large")
    assert world.snapshot() == before


def test_batch_of_1001_is_400_and_1000_answers_each(world: World) -> None:
    envelope = right_transfer(world).seal()
    before = world.snapshot()
    response = world.client.post(
        "/api/envelopes/batch", json={"atomic": False, "envelopes": [envelope] * 1001}
    )
    assert_error(response, 400)
    assert world.snapshot() == before
    response = world.client.post("/api/envelopes/batch", json={"envelopes": [{}] * 1000})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(1000))
    assert {r["status"] for r in results} == {400}
    assert world.snapshot() == before


def _failing_item(w: World, kind: str) -> object:
    if kind == "insufficient funds":
        return right_transfer(w).but(amount=10**12).seal()
    if kind == "state change refused":
        return right_register(w).but(actor="member:bob", handle="bob").seal()
    if kind == "unauthenticated":
        return right_transfer(w).but(keys=(generate_signing_key(),)).seal()
    if kind == "forbidden":
        return right_transfer(w).but(keys=(w.bob,), actor="member:bob").seal()
    assert kind == "malformed"
    return {"payloadType": "x"}


@pytest.mark.parametrize(
    "kind",
    ["insufficient funds", "state change refused", "unauthenticated", "forbidden", "malformed"],
)
def test_atomic_batch_with_a_failing_item_is_409_and_applies_nothing(
    world: World, kind: str
) -> None:
    good = [
        right_deposit(world).seal(),
        right_register(world).seal(),
        right_transfer(world).seal(),
    ]
    batch = [*good[:2], _failing_item(world, kind), good[2]]
    before = world.snapshot()
    response = world.client.post("/api/envelopes/batch", json={"atomic": True, "envelopes": batch})
    assert_error(response, 409, "batch_failed")
    assert response.json()["error"]["detail"]["index"] == 2
    assert world.snapshot() == before
    # nothing was remembered either: each good item is new, not a replay
    for envelope in good:
        assert world.post(envelope).status_code == 201


def test_non_atomic_batch_answers_per_index(world: World) -> None:
    good = right_transfer(world).seal()
    batch = [
        good,
        right_transfer(world).but(keys=(generate_signing_key(),)).seal(),
        right_transfer(world).but(amount=10**12).seal(),
        good,
        {},
        right_deposit(world).but(keys=(world.alice,), actor="member:alice").seal(),
    ]
    before = world.snapshot()
    response = world.client.post("/api/envelopes/batch", json={"atomic": False, "envelopes": batch})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(len(batch)))
    assert [r["status"] for r in results] == [201, 401, 409, 200, 400, 403]
    assert results[3]["body"] == results[0]["body"]
    for result in results[1:]:
        if result["status"] >= 400:
            assert set(result["body"]["error"]) == {"type", "message", "detail"}
    after = world.snapshot()
    assert after["journal_size"] == before["journal_size"] + 1
    balances = {(a[0], a[1]): a[3] - a[2] for a in after["accounts"]}
    earlier = {(a[0], a[1]): a[3] - a[2] for a in before["accounts"]}
    assert balances[("member:alice", "CU")] == earlier[("member:alice", "CU")] - 1
    assert balances[("member:bob", "CU")] == earlier[("member:bob", "CU")] + 1


def test_authenticated_refusals_are_remembered_and_unauthenticated_ones_are_not(
    world: World,
) -> None:
    refused = right_transfer(world).but(amount=10**12).seal()
    first = world.post(refused)
    assert_error(first, 409, "insufficient_funds")
    before = world.snapshot()
    again = world.post(refused)
    assert again.status_code == 409
    assert again.json() == first.json()
    taken = payload_of(refused)["id"]
    other = right_transfer(world).seal(id_=taken)
    assert_error(world.post(other), 409, "idempotency_conflict")
    assert world.snapshot() == before
    # an envelope that did not authenticate reserves nothing: its id stays free
    stranger = right_transfer(world).but(keys=(generate_signing_key(),)).seal()
    assert_error(world.post(stranger), 401)
    free = payload_of(stranger)["id"]
    assert world.post(right_transfer(world).seal(id_=free)).status_code == 201


def test_replay_is_answered_after_the_skew_window(db_url: str, tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "data")
    clock = ManualClock()
    with (
        run_server(db_url, data, clock=clock, created_at_skew_seconds=2) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        # Signed at the ledger's time, which moves only when the test moves it.
        signed_at = format_timestamp(clock.now())
        key = generate_signing_key()
        fields = {"actor": "member:erin", "handle": "erin", "public_key": public(key)}
        register = seal("member.register", fields, (key,), created_at=signed_at)
        assert client.post("/api/envelopes", json=register).status_code == 201
        deposit = {
            "actor": "operator",
            "to": "member:erin",
            "asset": "CU",
            "amount": 10,
            "external_ref": "late-1",
        }
        envelope = seal("deposit", deposit, (server.operator_key,), created_at=signed_at)
        first = client.post("/api/envelopes", json=envelope)
        assert first.status_code == 201, first.text
        size = client.get("/journal/checkpoint").text.splitlines()[1]
        clock.advance(3)  # past the window of ±2 s
        again = client.post("/api/envelopes", json=envelope)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        # the same created_at on a new envelope is now outside the window
        created_at = payload_of(envelope)["created_at"]
        late = seal(
            "deposit",
            {**deposit, "external_ref": "late-2"},
            (server.operator_key,),
            created_at=created_at,
        )
        assert_error(client.post("/api/envelopes", json=late), 400, "invalid_payload")
        assert client.get("/journal/checkpoint").text.splitlines()[1] == size


def test_replay_is_answered_after_the_signer_lost_its_key_and_was_suspended(
    world: World,
) -> None:
    handle, key = world.fresh_member()
    world.deposit(handle, 10, f"replay-{handle}")
    envelope = (
        right_transfer(world)
        .but(keys=(key,), actor=f"member:{handle}", **{"from": f"member:{handle}"})
        .seal()
    )
    first = world.accept(envelope)
    new = generate_signing_key()
    rotate = {"actor": f"member:{handle}", "handle": handle, "new_public_key": public(new)}
    world.accept(seal("key.rotate", rotate, (key, new)))
    suspend = {"actor": "operator", "handle": handle, "status": "suspended"}
    world.accept(seal("member.update", suspend, (world.operator,)))
    before = world.snapshot()
    again = world.post(envelope)
    assert again.status_code == 200, again.text
    assert again.json() == first
    assert world.snapshot() == before


def test_one_id_twice_in_a_batch(world: World) -> None:
    first = right_transfer(world).seal()
    same_id = right_transfer(world).but(amount=2).seal(id_=payload_of(first)["id"])
    before = world.snapshot()
    response = world.client.post(
        "/api/envelopes/batch", json={"envelopes": [first, same_id, first]}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 409, 200]
    assert results[1]["body"]["error"]["type"] == "idempotency_conflict"
    assert results[2]["body"] == results[0]["body"]
    assert world.snapshot()["journal_size"] == before["journal_size"] + 1
