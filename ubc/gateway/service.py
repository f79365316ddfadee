"""The metered model endpoint's logic, between the HTTP layer and the ledger.

A call goes: find the model (404) → authenticate the key and its grant (401, 403) →
rate limits (429) → hold the cost's upper bound, clamping ``max_tokens`` to what the
account can afford (402) → the backend → a ``usage`` entry that posts the actual cost
and releases the rest. The usage entry is queued for the group-commit writer while the
answer goes back to the caller: the hold already guarantees that the call is paid for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ubc.dbtypes import utcnow
from ubc.envelopes.service import LedgerContext, Prechecked
from ubc.envelopes.writer import GroupCommitWriter
from ubc.errors import UbcError
from ubc.gateway.catalog import ModelSpec
from ubc.gateway.metering import (
    HoldRequest,
    HoldWriter,
    new_request_id,
    usage_envelope,
)
from ubc.gateway.ratelimit import Limit, RateLimited, RateLimiter
from ubc.gateway.upstream import UpstreamPool
from ubc.members.models import ApiKey
from ubc.metering import rules

log = logging.getLogger("ubc.gateway")
apikeys_t = ApiKey.__table__  # type: ignore[attr-defined]

# How long a grant read from the database is trusted for the early checks; the hold's
# transaction checks it again under its lock (revocation, expiry, member status).
GRANT_TTL_SECONDS = 2.0
# Tokens an image part of a chat message may cost at most (OpenAI: 85–1,445 per image).
IMAGE_TOKEN_BOUND = 1500


class GatewayError(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def from_ledger_error(error: UbcError) -> GatewayError:
    """The OpenAI-shaped error of a ledger refusal."""
    if error.status_code == 401:
        return GatewayError(401, error.message, code="invalid_api_key")
    if error.status_code == 403:
        return GatewayError(403, error.message, type_="permission_error", code=error.error_type)
    if error.status_code == 402 or error.error_type == "insufficient_funds":
        detail = error.detail
        message = (
            "You exceeded your current quota: "
            f"{error.message}. Your allocation is exhausted until the next epoch or a transfer."
        )
        if error.error_type == "spend_cap_reached":
            message = f"You exceeded your current quota: {error.message}."
        return GatewayError(
            402,
            message,
            type_="insufficient_quota",
            code="insufficient_quota",
            param=json.dumps(detail, sort_keys=True) if detail else None,
        )
    return GatewayError(error.status_code, error.message, type_="server_error")


@dataclass(frozen=True, slots=True)
class Grant:
    key_hash: str
    account: str
    scopes: frozenset[str]
    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    expires_at: datetime | None
    revoked: bool


@dataclass(slots=True)
class Call:
    """One metered call in flight."""

    request_id: str
    grant: Grant
    spec: ModelSpec
    price: dict[str, int]
    held: int
    limits: list[Limit]
    reserved_tokens: int
    settled: bool = False


def key_hash_of(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise GatewayError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    return hashlib.sha256(authorization[7:].strip().encode()).hexdigest()


def prompt_bound(body: dict[str, Any]) -> int:
    """An upper bound of a chat prompt's tokens without the upstream's tokenizer.

    A byte-level BPE token covers at least one byte, so the UTF-8 size of the messages
    (and tools) as compact JSON bounds their tokens, chat-template overhead included; each
    image part adds the most an image may cost.
    """
    parts = {k: body[k] for k in ("messages", "tools", "functions", "response_format") if k in body}
    size = len(json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode())
    images = sum(
        1
        for message in body.get("messages", [])
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image_url"
    )
    return size + images * IMAGE_TOKEN_BOUND


def estimate_tokens(bound: int) -> int:
    """What is billed for a prompt when the upstream reports no usage (a stream cut before
    its usage chunk): a quarter of its byte bound, the usual bytes per BPE token."""
    return math.ceil(bound / 4)


def max_output_tokens(held: int, input_tokens: int, price: dict[str, int], cap: int) -> int:
    """The most output tokens ``held`` CU pays for after the prompt, at most ``cap``."""
    if price["output"] == 0:
        return cap
    return max(0, min(cap, (held * 1000 - input_tokens * price["input"]) // price["output"]))


class Gateway:
    def __init__(
        self,
        *,
        ctx: LedgerContext,
        catalog: dict[str, ModelSpec],
        prices: dict[str, dict[str, int]],
        read_sessions: sessionmaker[Session],
        holds: HoldWriter,
        writer: GroupCommitWriter,
    ) -> None:
        self.ctx = ctx
        self.catalog = catalog
        self.prices = prices
        self.read_sessions = read_sessions
        self.holds = holds
        self.writer = writer
        self.limiter = RateLimiter()
        self.upstreams = UpstreamPool()
        self._grants: dict[str, tuple[float, Grant | None]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._settling_by_account: dict[str, set[asyncio.Task[None]]] = {}

    # -- the steps of a call --

    def model(self, model_id: object, kind: str) -> ModelSpec:
        spec = self.catalog.get(model_id) if isinstance(model_id, str) else None
        if spec is None:
            raise GatewayError(
                404,
                f"The model '{model_id}' does not exist",
                code="model_not_found",
                param="model",
            )
        if spec.kind != kind:
            raise GatewayError(
                400,
                f"The model '{spec.id}' is a {spec.kind} model",
                code="wrong_model_kind",
                param="model",
            )
        if spec.id not in self.prices:
            raise GatewayError(
                503,
                f"The model '{spec.id}' has no price in the journal yet "
                "(the operator publishes prices with ledger.config)",
                type_="server_error",
                code="model_not_priced",
            )
        return spec

    async def authorize(self, authorization: str | None, spec: ModelSpec) -> Grant:
        key_hash = key_hash_of(authorization)
        grant = await self._grant(key_hash)
        if grant is None or grant.revoked:
            raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        if grant.expires_at is not None and grant.expires_at <= utcnow():
            raise GatewayError(401, "This API key has expired", code="invalid_api_key")
        if "models" not in grant.scopes:
            raise GatewayError(
                403,
                "This API key has no `models` scope",
                type_="permission_error",
                code="insufficient_scope",
            )
        if grant.models is not None and spec.id not in grant.models:
            raise GatewayError(
                403,
                f"This API key may not use the model '{spec.id}'",
                type_="permission_error",
                code="model_not_allowed",
                param="model",
            )
        return grant

    async def begin(
        self, grant: Grant, spec: ModelSpec, *, input_bound: int, output_cap: int
    ) -> Call:
        """Rate limits, then the hold; raises GatewayError (429, 402, ...)."""
        price = self.prices[spec.id]
        limits = [Limit(f"key:{grant.key_hash}", grant.rpm, grant.tpm)]
        if spec.rpm is not None or spec.tpm is not None:
            limits.append(Limit(f"key:{grant.key_hash}:{spec.id}", spec.rpm, spec.tpm))
        reserved = input_bound + output_cap
        try:
            self.limiter.acquire(limits, reserved)
        except RateLimited as exc:
            raise GatewayError(
                429,
                f"Rate limit reached: {exc}. Retry after {exc.retry_after} s.",
                type_="requests",
                code="rate_limit_exceeded",
                headers={"retry-after": str(exc.retry_after)},
            ) from None
        want = max(1, rules.usage_cost(input_bound, output_cap, price))
        need = max(1, rules.usage_cost(input_bound, 1 if output_cap else 0, price))
        request_id = new_request_id()
        request = HoldRequest(request_id, grant.account, grant.key_hash, spec.id, want, need)
        try:
            outcome = await self.holds.hold(request)
            earlier = self._settling_by_account.get(grant.account)
            if isinstance(outcome, UbcError) and outcome.status_code in (402, 409) and earlier:
                # Calls answered a moment ago may still hold what this one needs: once
                # their usage entries are written (in this process), try once more.
                await asyncio.wait(list(earlier))
                request = replace(request, request_id=new_request_id())
                outcome = await self.holds.hold(request)
        except BaseException:
            self.limiter.refund(limits, reserved)
            raise
        if isinstance(outcome, UbcError):
            self.limiter.refund(limits, reserved)
            if outcome.status_code in (401, 403):
                self._grants.pop(grant.key_hash, None)
            raise from_ledger_error(outcome)
        return Call(request.request_id, grant, spec, price, outcome.amount, limits, reserved)

    def finish(self, call: Call, input_tokens: int, output_tokens: int) -> int:
        """Bill the call (0 tokens: release it unbilled); returns its cost. The usage
        entry is written by the group-commit writer after this returns."""
        if call.settled:
            return 0
        call.settled = True
        now = utcnow()
        cost = rules.call_cost(input_tokens, output_tokens, call.price, call.held)

        def item() -> Prechecked:
            # Built and signed in the writer's thread, off the event loop.
            return usage_envelope(
                self.ctx,
                request_id=call.request_id,
                account=call.grant.account,
                key_hash=call.grant.key_hash,
                model=call.spec.id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                held=call.held,
                cost=cost,
                now=now,
            )

        self.limiter.refund(call.limits, call.reserved_tokens - input_tokens - output_tokens)
        task = asyncio.get_running_loop().create_task(self._settle(call, item))
        self._settling.add(task)
        account = call.grant.account
        self._settling_by_account.setdefault(account, set()).add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._settling.discard(task)
            tasks = self._settling_by_account.get(account)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._settling_by_account[account]

        task.add_done_callback(done)
        return cost

    async def drain(self) -> None:
        """Wait for every queued usage entry (shutdown, and tests)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        await self.upstreams.aclose()

    # -- internals --

    async def _settle(self, call: Call, item: Callable[[], Prechecked]) -> None:
        try:
            outcomes = await self.writer.submit_internal([item])
        except Exception:
            log.exception("usage of call %s not journaled; its hold will expire", call.request_id)
            return
        outcome = outcomes[0]
        if isinstance(outcome, UbcError):
            log.error(
                "usage of call %s refused (%s %s: %s); its hold will expire unbilled",
                call.request_id,
                outcome.status_code,
                outcome.error_type,
                outcome.message,
            )

    async def _grant(self, key_hash: str) -> Grant | None:
        now = time.monotonic()
        cached = self._grants.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        grant = await asyncio.to_thread(self._load_grant, key_hash)
        if len(self._grants) > 100_000:
            self._grants.clear()
        self._grants[key_hash] = (now + GRANT_TTL_SECONDS, grant)
        return grant

    def _load_grant(self, key_hash: str) -> Grant | None:
        with self.read_sessions() as session:
            row = session.execute(
                select(
                    apikeys_t.c.account,
                    apikeys_t.c.scopes,
                    apikeys_t.c.models,
                    apikeys_t.c.rpm,
                    apikeys_t.c.tpm,
                    apikeys_t.c.expires_at,
                    apikeys_t.c.revoked,
                ).where(apikeys_t.c.key_hash == key_hash)
            ).first()
        if row is None:
            return None
        return Grant(
            key_hash=key_hash,
            account=row[0],
            scopes=frozenset(row[1].split(",")),
            models=frozenset(json.loads(row[2])) if row[2] is not None else None,
            rpm=row[3],
            tpm=row[4],
            expires_at=row[5],
            revoked=bool(row[6]),
        )
