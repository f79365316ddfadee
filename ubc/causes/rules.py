"""Rules of causes: registration by the operator, and what stewards may do.

``cause.register`` and ``cause.update`` are signed by the operator; their stewards must
be existing members (any status: a suspended steward simply cannot sign). Registering
opens ``cause:<slug>`` in every asset of the ledger. Donations are plain transfers to
``cause:<slug>`` (kind ``donation``: see ``ubc.envelopes.rules._transfer``); a steward
signs transfers and API-key grants from the cause's account, which
:func:`require_steward` authorizes.

Causes change only through envelopes that apply alone (no ledger operations), so every
later envelope of the same batch sees them: no per-batch cache is needed.
"""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update

from ubc.causes.models import Cause, CauseSteward
from ubc.envelopes.payloads import CauseRegister, CauseUpdate, Payload
from ubc.envelopes.rules import Plan, Signers, State, _operator
from ubc.errors import BadRequest, Conflict, Forbidden, NotFound
from ubc.ledger import service as ledger

causes_t = Cause.__table__  # type: ignore[attr-defined]
stewards_t = CauseSteward.__table__  # type: ignore[attr-defined]

CAUSE_PREFIX = "cause:"


def cause_address(slug: str) -> str:
    return f"{CAUSE_PREFIX}{slug}"


def cause_register(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, CauseRegister)
    _operator(payload, signers)
    if _exists(state, payload.slug):
        raise Conflict(f"cause {payload.slug} is already registered", detail={"slug": payload.slug})
    stewards = _check_stewards(state, payload.stewards)
    address = cause_address(payload.slug)

    def after() -> None:
        state.session.execute(
            insert(causes_t).values(
                slug=payload.slug,
                name=payload.name,
                description=payload.description,
                envelope_id=payload.id,
                created_at=state.now,
                updated_at=state.now,
            )
        )
        _store_stewards(state, payload.slug, stewards)
        ledger.open_accounts(
            state.session, [(address, asset) for asset in state.ctx.assets], now=state.now
        )

    return Plan(accounts=frozenset({address}), after=after)


def cause_update(state: State, payload: Payload, signers: Signers) -> Plan:
    assert isinstance(payload, CauseUpdate)
    _operator(payload, signers)
    if not _exists(state, payload.slug):
        raise NotFound(f"no cause {payload.slug}", detail={"slug": payload.slug})
    stewards = _check_stewards(state, payload.stewards)

    def after() -> None:
        state.session.execute(
            update(causes_t)
            .where(causes_t.c.slug == payload.slug)
            .values(
                name=payload.name,
                description=payload.description,
                envelope_id=payload.id,
                updated_at=state.now,
            )
        )
        state.session.execute(delete(stewards_t).where(stewards_t.c.slug == payload.slug))
        _store_stewards(state, payload.slug, stewards)

    return Plan(accounts=frozenset({cause_address(payload.slug)}), after=after)


def require_steward(state: State, account: str, handle: str) -> None:
    """Forbidden unless ``member:handle`` is a steward of the cause ``account``; NotFound
    for a cause that is not registered."""
    slug = account.removeprefix(CAUSE_PREFIX)
    if not account.startswith(CAUSE_PREFIX) or not _exists(state, slug):
        raise NotFound(f"no cause {slug}", detail={"account": account})
    row = state.session.execute(
        select(stewards_t.c.handle).where(stewards_t.c.slug == slug, stewards_t.c.handle == handle)
    ).first()
    if row is None:
        raise Forbidden(
            f"member:{handle} is not a steward of {account}: only its stewards act for it",
            detail={"account": account},
        )


# --- internals --------------------------------------------------------------------------


def _exists(state: State, slug: str) -> bool:
    return (
        state.session.execute(select(causes_t.c.slug).where(causes_t.c.slug == slug)).first()
        is not None
    )


def _check_stewards(state: State, handles: list[str]) -> list[str]:
    if len(set(handles)) != len(handles):
        raise BadRequest("stewards are listed twice", detail={"stewards": handles})
    for handle in handles:
        if state.member(handle) is None:
            raise NotFound(
                f"no member {handle}: stewards must be members", detail={"handle": handle}
            )
    return sorted(handles)


def _store_stewards(state: State, slug: str, handles: list[str]) -> None:
    state.session.execute(insert(stewards_t), [{"slug": slug, "handle": h} for h in handles])
