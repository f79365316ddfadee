"""The metered model endpoint's logic, between the HTTP layer and the ledger.

A call goes: find the model (404) → authenticate the key and its grant (401, 403) →
rate limits (429) → hold the cost's upper bound, clamping ``max_tokens`` to what the
account can afford (402) → the backend → a ``usage`` entry that posts the actual cost
and releases the rest. The usage entry is queued for the group-commit writer while the
answer goes back to the caller: the hold already guarantees that the call is paid for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ubc import logs, metrics
from ubc.clock import SYSTEM_CLOCK, Clock
from ubc.db import table
from ubc.errors import UbcError
from ubc.gateway.catalog import ModelSpec
from ubc.gateway.metering import (
    Held,
    HoldRequest,
    HoldWriter,
    new_request_id,
    usage_envelope,
)
from ubc.gateway.ratelimit import Limit, RateLimited, RateLimiter
from ubc.gateway.ratelimit_redis import SharedRateLimiter
from ubc.gateway.tokens import CHAT_COUNTED_FIELDS, byte_bound
from ubc.gateway.upstream import UpstreamPool
from ubc.members.models import ApiKey
from ubc.metering import rules
from ubc.rules.writing import InternalWriter, LedgerContext, Prechecked

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("ubc.gateway")
#: One line per journaled usage entry (enabled with the access log: ubc.logs).
usage_log = logging.getLogger("ubc.usage")
apikeys_t = table(ApiKey)

# How long a grant read from the database is trusted for the early checks; the hold's
# transaction checks it again under its lock (revocation, expiry, member status).
GRANT_TTL_SECONDS = 2.0

# A spare hold (see :meth:`Gateway.begin`) is taken by a call of its key and model at most
# this long after it was placed, else released unbilled: the checks its transaction made
# under the key's lock (revocation, expiry, member status, spend cap) are never older than
# this, less than the grant cache above.
SPARE_SECONDS = 1.0
# At most this many spare holds per process (one per account, key and model).
MAX_SPARES = 10_000
# A usage entry and a spare hold start their transaction this long after they are due:
# past the answer being sent and the next call of a lone caller reaching its upstream, so
# that their thread's work (several ms holding the GIL) does not delay either.
OFF_PATH_SECONDS = 0.004


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
    """The OpenAI-shaped error of a ledger refusal. A 402 names no parameter (OpenAI's
    ``param`` is a request parameter or null): its message says the shortfall."""
    if error.status_code == 401:
        return GatewayError(401, error.message, code="invalid_api_key")
    if error.status_code == 403:
        return GatewayError(403, error.message, type_="permission_error", code=error.error_type)
    if error.status_code == 402 or error.error_type == "insufficient_funds":
        return GatewayError(
            402,
            quota_message(error),
            type_="insufficient_quota",
            code="insufficient_quota",
        )
    return GatewayError(error.status_code, error.message, type_="server_error")


def quota_message(error: UbcError) -> str:
    """``You exceeded your current quota: ...`` with the shortfall in words, from the
    ledger's detail (``amount``/``available`` of a hold, ``cap``/``left``/``needed`` of a
    key's spend cap)."""
    detail = error.detail if isinstance(error.detail, dict) else {}
    if error.error_type == "spend_cap_reached":
        cap, left, needed = detail.get("cap"), detail.get("left"), detail.get("needed")
        if isinstance(cap, int) and isinstance(left, int) and isinstance(needed, int):
            return (
                f"You exceeded your current quota: this key's spend cap of {cap} CU per "
                f"epoch is reached: this call needs at least {needed} CU and {left} CU of "
                "it are left."
            )
        return f"You exceeded your current quota: {error.message}."
    needed, available = detail.get("amount"), detail.get("available")
    if isinstance(needed, int) and isinstance(available, int):
        return (
            f"You exceeded your current quota: this call needs at least {needed} CU and "
            f"{available} CU are available. Your allocation is exhausted until the next "
            "epoch or a transfer."
        )
    return (
        f"You exceeded your current quota: {error.message}. Your allocation is exhausted "
        "until the next epoch or a transfer."
    )


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
    #: The ``x-ratelimit-*`` headers of the call's buckets once it passed them.
    rate_headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False

    def headers(self) -> dict[str, str]:
        """The headers of a successful answer: the request id and the rate limits."""
        return {"x-request-id": self.request_id, **self.rate_headers}


@dataclass(slots=True)
class _Spare:
    """A hold placed ahead for the next call of one key and model (``Gateway.begin``)."""

    held: Held
    grant: Grant
    spec: ModelSpec
    placed: datetime
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Refill:
    """A spare hold being placed; ``claimed`` once a call waits for it."""

    task: asyncio.Task[None]
    claimed: bool = False


def key_hash_of(authorization: str | None) -> str:
    scheme, _, secret = (authorization or "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise GatewayError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    return hashlib.sha256(secret.encode()).hexdigest()


# The chat request fields the gateway forwards (OpenAI's chat completions schema), by how
# the prompt bound treats them. Any other field is refused (400 naming it): an upstream
# may read text from fields the gateway does not know (vLLM's ``documents``,
# ``chat_template``, ``guided_json``; OpenAI's ``prediction``...) that the hold would not
# cover.
#: Fields that carry text the upstream may read as prompt (``CHAT_COUNTED_FIELDS``, in
#: ``ubc.gateway.tokens``): counted by the prompt's bound.
#: Fields that carry no text, checked to be a small value of their type (or null): not
#: counted. ``model``, ``n``, ``max_tokens``, ``max_completion_tokens`` and
#: ``stream_options`` are checked and rewritten by the endpoint itself.
CHAT_NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
CHAT_INT_FIELDS = ("seed", "top_logprobs")
CHAT_BOOL_FIELDS = ("stream", "logprobs", "parallel_tool_calls")
CHAT_ENUM_FIELDS = {
    "reasoning_effort": ("none", "minimal", "low", "medium", "high"),
    "verbosity": ("low", "medium", "high"),
}
CHAT_OWN_FIELDS = ("model", "n", "max_tokens", "max_completion_tokens", "stream_options")
CHAT_FIELDS = frozenset(
    (
        *CHAT_COUNTED_FIELDS,
        *CHAT_NUMBER_FIELDS,
        *CHAT_INT_FIELDS,
        *CHAT_BOOL_FIELDS,
        *CHAT_ENUM_FIELDS,
        *CHAT_OWN_FIELDS,
    )
)


def check_chat_fields(body: dict[str, Any]) -> None:
    """Refuse (400 naming it) a field the gateway would not forward or count, and a value
    of a not-counted field that is not the small scalar it must be."""
    for name, value in body.items():
        if name not in CHAT_FIELDS:
            raise GatewayError(
                400,
                f"Unrecognized request argument supplied: {name} (the endpoint forwards "
                "only the fields of OpenAI's chat completions that it meters)",
                code="unknown_parameter",
                param=name,
            )
        if value is None:
            continue
        if name in CHAT_NUMBER_FIELDS:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        elif name in CHAT_INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and -(2**63) <= value < 2**64
        elif name in CHAT_BOOL_FIELDS:
            ok = isinstance(value, bool)
        elif name in CHAT_ENUM_FIELDS:
            ok = value in CHAT_ENUM_FIELDS[name]
        elif name == "stream_options":
            ok = isinstance(value, dict) and all(
                key in ("include_usage", "include_obfuscation") and isinstance(flag, bool)
                for key, flag in value.items()
            )
        else:
            continue
        if not ok:
            raise GatewayError(400, f"Invalid value for '{name}'", param=name)


def prompt_bound(body: dict[str, Any]) -> int:
    """An upper bound of a chat prompt's tokens without the model's tokenizer: the byte
    bound (:func:`ubc.gateway.tokens.byte_bound`).

    A byte-level BPE token covers at least one byte, so the UTF-8 size of every field that
    carries text (:data:`CHAT_COUNTED_FIELDS`: the messages, tools, schemas, stop
    sequences...) as compact JSON bounds their tokens, chat-template overhead included;
    each image part adds the most an image may cost (``tokens.IMAGE_TOKEN_BOUND``). The other
    forwarded fields are numbers, booleans and short enums (:func:`check_chat_fields`),
    which are no prompt. A model with a tokenizer is held for its tokenizer bound instead
    (:meth:`ubc.gateway.tokens.PromptTokenizer.bound`).
    """
    return byte_bound(body)


def estimate_tokens(bound: int) -> int:
    """What is billed for a prompt when the upstream reports no usage (a stream cut before
    its usage chunk) and the model has no tokenizer: a quarter of its byte bound, the usual
    bytes per BPE token. (With a tokenizer, its count is billed: ``usage_tokens``'s
    ``estimate``.)"""
    return math.ceil(bound / 4)


def usage_tokens(
    usage: object,
    bound: int,
    delivered: int = 0,
    *,
    answer: dict[str, Any] | None = None,
    completion: bool = True,
    estimate: int | None = None,
) -> tuple[int, int]:
    """The input and output tokens a call is billed: the upstream's ``usage`` (a JSON
    answer's, or a stream's last usage chunk) when it reports ``prompt_tokens``, else
    estimates: the prompt's ``estimate`` when it was counted by the model's tokenizer,
    else the byte ``bound``'s (:func:`estimate_tokens`), and what was ``delivered`` (a
    stream's content chunks), or the estimate of a JSON ``answer``'s text.
    ``completion=False`` (embeddings): no output tokens."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        output = int(usage.get("completion_tokens") or 0) if completion else 0
        return usage["prompt_tokens"], output
    if answer is not None:
        text = "".join(
            str((choice.get("message") or {}).get("content") or "")
            for choice in answer.get("choices", [])
        )
        delivered = estimate_tokens(len(text.encode()))
    return (estimate_tokens(bound) if estimate is None else estimate), delivered


def max_output_tokens(held: int, input_tokens: int, price: dict[str, int], cap: int) -> int:
    """The most output tokens ``held`` CU pays for after the prompt, at most ``cap``."""
    if price["output"] == 0:
        return cap
    return max(0, min(cap, (held * 1000 - input_tokens * price["input"]) // price["output"]))


class Busy(GatewayError):
    def __init__(self, message: str) -> None:
        super().__init__(
            429,
            message,
            type_="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        )


@dataclass(slots=True)
class _KeySlots:
    semaphore: asyncio.Semaphore
    size: int
    calls: int = 0  # in progress, waiting for a slot or not
    jobs: int = 0  # running in the pool (a job outlives a cancelled call)


@dataclass(slots=True)
class CpuSlots:
    """Where CPU-heavy work of the gateway runs (tokenizing, local inference): in a pool
    of its own threads, one per core, so that it never blocks the event loop nor takes
    the default executor's threads from the database calls; and at most ``per_key`` jobs
    at once per API key, so that one member's large inputs cannot take every core from
    the others. A key may have ``MAX_CALLS_PER_SLOT × per_key`` calls in progress at
    most (waiting ones included); more are refused with 429 before anything is held.
    """

    MAX_CALLS_PER_SLOT = 32

    workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    _keys: dict[str, _KeySlots] = field(default_factory=dict)
    _executor: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def key(self, key_hash: str, per_key: int) -> AsyncIterator[KeyCpu]:
        """A call of ``key_hash`` that may run CPU jobs (:meth:`KeyCpu.run`)."""
        slots = self._keys.get(key_hash)
        if slots is None:
            slots = self._keys[key_hash] = _KeySlots(asyncio.Semaphore(per_key), per_key)
        if slots.calls >= self.MAX_CALLS_PER_SLOT * slots.size:
            raise Busy(
                f"Too many calls of this API key in progress ({slots.calls}): retry after 1 s"
            )
        slots.calls += 1
        try:
            yield KeyCpu(self, key_hash, slots)
        finally:
            slots.calls -= 1
            self._forget(key_hash, slots)

    def _forget(self, key_hash: str, slots: _KeySlots) -> None:
        if slots.calls == 0 and slots.jobs == 0 and self._keys.get(key_hash) is slots:
            del self._keys[key_hash]

    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="ubc-gateway-cpu")
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


@dataclass(frozen=True, slots=True)
class KeyCpu:
    cpu: CpuSlots
    key_hash: str
    slots: _KeySlots

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)`` in the CPU pool, in one of the key's slots."""
        slots = self.slots
        await slots.semaphore.acquire()
        try:
            job = asyncio.get_running_loop().run_in_executor(
                self.cpu.executor(), lambda: function(*args, **kwargs)
            )
        except BaseException:
            slots.semaphore.release()
            raise
        slots.jobs += 1

        def done(_: object) -> None:
            # The slot is the key's until the thread is done, even if the call that
            # started the job was cancelled meanwhile.
            slots.jobs -= 1
            slots.semaphore.release()
            self.cpu._forget(self.key_hash, slots)

        job.add_done_callback(done)
        return await asyncio.shield(job)


class Metered:
    """One metered call as a service call: ``async with gateway.metered(...) as m:``.

    Entering rate-limits and holds (:meth:`Gateway.begin`; 429, 402...). The route records
    what the call used (:meth:`bill`, :meth:`usage_from`); leaving the block bills
    exactly that, once, and leaving it by any exception or cancellation releases the hold
    unbilled. A stream takes the call over with :meth:`detach` and settles it itself
    (:meth:`settle`) when it ends. One object per call: it is its own context manager.
    """

    __slots__ = (
        "gateway",
        "grant",
        "spec",
        "input_bound",
        "output_cap",
        "input_floor",
        "call",
        "input_tokens",
        "output_tokens",
        "detached",
    )

    def __init__(
        self,
        gateway: Gateway,
        grant: Grant,
        spec: ModelSpec,
        input_bound: int,
        output_cap: int,
        input_floor: int | None,
    ) -> None:
        self.gateway = gateway
        self.grant = grant
        self.spec = spec
        self.input_bound = input_bound
        self.output_cap = output_cap
        self.input_floor = input_floor
        #: The call once held (``None`` before, or when the hold was refused).
        self.call: Call | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.detached = False

    async def __aenter__(self) -> Metered:
        self.call = await self.gateway.begin(
            self.grant,
            self.spec,
            input_bound=self.input_bound,
            output_cap=self.output_cap,
            input_floor=self.input_floor,
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self.detached:
            return
        if exc_type is not None:
            self.release()
        else:
            self.settle()

    @property
    def held(self) -> Call:
        """The call in flight (inside the block)."""
        assert self.call is not None, "used outside its block"
        return self.call

    def headers(self) -> dict[str, str]:
        """The headers of a successful answer (:meth:`Call.headers`)."""
        return self.held.headers()

    def output_allowed(self, choices: int = 1) -> int:
        """The output tokens per choice that what was held pays for after the prompt
        bound, at most the cap; 402 when not even one per choice."""
        call = self.held
        allowed = (
            max_output_tokens(call.held, self.input_bound, call.price, self.output_cap) // choices
        )
        if allowed < 1:
            raise GatewayError(
                402,
                "You exceeded your current quota: not enough left for one token per choice",
                type_="insufficient_quota",
                code="insufficient_quota",
            )
        return allowed

    def require_covered(self, input_tokens: int) -> None:
        """402 unless what was held pays for ``input_tokens`` counted after the hold."""
        call = self.held
        if rules.usage_cost(input_tokens, 0, call.price) > call.held:
            raise GatewayError(
                402,
                f"You exceeded your current quota: these inputs are {input_tokens} tokens, "
                f"more than the {call.held} CU left pay for",
                type_="insufficient_quota",
                code="insufficient_quota",
            )

    def bill(self, input_tokens: int, output_tokens: int) -> None:
        """Record what the call used: billed when the block (or the stream) ends."""
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens

    def usage_from(
        self,
        usage: object,
        bound: int,
        delivered: int = 0,
        *,
        answer: dict[str, Any] | None = None,
        completion: bool = True,
        estimate: int | None = None,
    ) -> None:
        """Record the upstream's ``usage``, or the estimates without it
        (:func:`usage_tokens`)."""
        self.input_tokens, self.output_tokens = usage_tokens(
            usage, bound, delivered, answer=answer, completion=completion, estimate=estimate
        )

    def detach(self) -> Metered:
        """Hand the call over (to a stream): leaving the block no longer settles it; the
        new owner calls :meth:`settle`."""
        self.detached = True
        return self

    def settle(self) -> None:
        """Bill what was recorded (nothing once settled)."""
        if self.call is not None:
            self.gateway.finish(self.call, self.input_tokens, self.output_tokens)

    def release(self) -> None:
        """Release the hold unbilled (nothing once settled)."""
        if self.call is not None:
            self.gateway.finish(self.call, 0, 0)


class Gateway:
    def __init__(
        self,
        *,
        ctx: LedgerContext,
        catalog: dict[str, ModelSpec],
        prices: dict[str, dict[str, int]],
        read_sessions: sessionmaker[Session],
        holds: HoldWriter,
        writer: InternalWriter,
        clock: Clock = SYSTEM_CLOCK,
        redis_url: str | None = None,
        spare_holds: bool = False,
    ) -> None:
        self.clock = clock
        self.ctx = ctx
        self.catalog = catalog
        self.prices = prices
        self.read_sessions = read_sessions
        self.holds = holds
        self.writer = writer
        self.limiter = RateLimiter()
        # With UBC_REDIS_URL, the limits of every worker and host, in Redis (the process's
        # own buckets stand in while Redis cannot be reached).
        self.shared_limiter = (
            SharedRateLimiter(redis_url, ctx.origin, self.limiter) if redis_url else None
        )
        self.upstreams = UpstreamPool()
        self.cpu = CpuSlots()
        self._grants: dict[str, tuple[float, Grant | None]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._settling_by_account: dict[str, set[asyncio.Task[None]]] = {}
        #: Spare holds (``begin``), by account, key hash and model.
        self.spare_holds = spare_holds
        self._spares: dict[tuple[str, str, str], _Spare] = {}
        self._refills: dict[tuple[str, str, str], _Refill] = {}
        self._closing = False
        self._recent: dict[tuple[str, str, str], float] = {}
        #: Calls that took a spare hold (tests, and the benchmark's reading of it).
        self.spares_taken = 0

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

    async def identify(self, authorization: str | None) -> Grant:
        """The grant of a valid key (401 for a missing, unknown, revoked or expired key,
        whatever its scopes), from the headers alone (and the 2 s cache of grants)."""
        key_hash = key_hash_of(authorization)
        grant = await self._grant(key_hash)
        if grant is None:
            raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        refusal = rules.key_refusal(grant.revoked, grant.expires_at, self.clock.now())
        if refusal == "revoked":
            raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        if refusal == "expired":
            raise GatewayError(401, "This API key has expired", code="invalid_api_key")
        logs.set_actor(grant.account)  # the access line's actor (never the key)
        return grant

    async def authenticate(self, authorization: str | None) -> Grant:
        """The key's grant (401, 403 without the ``models`` scope): from the headers alone,
        before the body is read."""
        grant = await self.identify(authorization)
        if rules.grant_refusal(grant.scopes, grant.models, None) == "scope":
            raise GatewayError(
                403,
                "This API key has no `models` scope",
                type_="permission_error",
                code="insufficient_scope",
            )
        return grant

    def permit(self, grant: Grant, spec: ModelSpec) -> None:
        """403 unless the grant allows the model (its scope was checked by
        :meth:`authenticate`)."""
        if rules.grant_refusal(grant.scopes, grant.models, spec.id) == "model":
            raise GatewayError(
                403,
                f"This API key may not use the model '{spec.id}'",
                type_="permission_error",
                code="model_not_allowed",
                param="model",
            )

    async def begin(
        self,
        grant: Grant,
        spec: ModelSpec,
        *,
        input_bound: int,
        output_cap: int,
        input_floor: int | None = None,
    ) -> Call:
        """Rate limits, then the hold; raises GatewayError (429, 402, ...).

        The hold is of the cost of ``input_bound`` + ``output_cap`` tokens, or less down to
        that of ``input_floor`` (default: ``input_bound``) + one output token: the caller
        checks that what was held covers the call (``max_tokens`` clamped to it, or the
        input's counted tokens)."""
        price = self.prices[spec.id]
        limits = [Limit(f"key:{grant.key_hash}", grant.rpm, grant.tpm)]
        if spec.rpm is not None or spec.tpm is not None:
            limits.append(Limit(f"key:{grant.key_hash}:{spec.id}", spec.rpm, spec.tpm))
        reserved = input_bound + output_cap
        shared = self.shared_limiter
        try:
            if shared is None:
                rate_headers = self.limiter.acquire(limits, reserved)
            else:
                rate_headers = await shared.acquire(limits, reserved)
        except RateLimited as exc:
            metrics.RATELIMIT_REFUSALS.labels(spec.id).inc()
            raise GatewayError(
                429,
                f"Rate limit reached: {exc}. Retry after {exc.retry_after} s.",
                type_="requests",
                code="rate_limit_exceeded",
                headers={"retry-after": str(exc.retry_after), **exc.headers},
            ) from None
        want = max(1, rules.usage_cost(input_bound, output_cap, price))
        floor = input_bound if input_floor is None else min(input_floor, input_bound)
        need = max(1, rules.usage_cost(floor, 1 if output_cap else 0, price))
        slot = (grant.account, grant.key_hash, spec.id)
        request_id = logs.call_id()  # the request's id when the server made it
        try:
            outcome: Held | UbcError | None = await self._take_spare(slot, want)
            if outcome is None:
                request = HoldRequest(
                    request_id, grant.account, grant.key_hash, spec.id, want, need
                )
                outcome = await self.holds.hold(request)
                if isinstance(outcome, UbcError) and outcome.status_code in (402, 409):
                    # This process's spare holds on the account give their share back; and
                    # calls answered a moment ago may still hold what this one needs: once
                    # their usage entries are written (in this process), try once more.
                    refills = [r.task for s, r in self._refills.items() if s[0] == grant.account]
                    if refills:
                        await asyncio.wait(refills)
                    self._release_spares(grant.account)
                    earlier = self._settling_by_account.get(grant.account)
                    if earlier:
                        await asyncio.wait(list(earlier))
                        request = replace(request, request_id=new_request_id())
                        outcome = await self.holds.hold(request)
        except BaseException:
            (shared or self.limiter).refund(limits, reserved)
            raise
        if isinstance(outcome, UbcError):
            (shared or self.limiter).refund(limits, reserved)
            if outcome.status_code in (401, 403):
                self._grants.pop(grant.key_hash, None)
            raise from_ledger_error(outcome)
        # A spare for the next call once calls of this key and model come one after
        # another (a call alone leaves none behind).
        moment = time.monotonic()
        last = self._recent.get(slot)
        if len(self._recent) >= MAX_SPARES:
            self._recent.clear()
        self._recent[slot] = moment
        if outcome.amount >= want and last is not None and moment - last <= SPARE_SECONDS:
            self._refill(slot, grant, spec, want)
        if outcome.request_id != request_id:
            logs.adopt_call_id(outcome.request_id)
        return Call(
            outcome.request_id, grant, spec, price, outcome.amount, limits, reserved, rate_headers
        )

    # -- spare holds --
    #
    # A lone call would wait for its own hold's transaction (a few ms of CPU and a durable
    # commit) before the upstream is called. Instead, once a call of a key and model holds
    # all it asked for, the same hold is placed again in the background, through the same
    # writer and checks, while the call runs: the next call of that key and model (within
    # SPARE_SECONDS) takes it at once, if it asks for no more. Every call still runs under
    # its own durable hold, placed and committed before its upstream is called, so
    # concurrent calls on any number of hosts can never spend more than the balance; a
    # spare merely holds one call's worth more for a moment. It is released unbilled (a
    # usage entry of 0 tokens) when unused for SPARE_SECONDS, when a hold of its account
    # is refused (402/409), and at shutdown; after a crash it expires as any hold does.

    async def _take_spare(self, slot: tuple[str, str, str], want: int) -> Held | None:
        if slot not in self._spares:
            refill = self._refills.get(slot)
            if refill is None or refill.claimed:
                return None
            # Placed a moment ago and nearly done: wait for it (once per refill).
            refill.claimed = True
            await asyncio.shield(refill.task)
        spare = self._spares.pop(slot, None)
        if spare is None:
            return None
        if spare.timer is not None:
            spare.timer.cancel()
        if spare.held.amount < want or self.clock.now() - spare.placed > timedelta(
            seconds=SPARE_SECONDS
        ):
            self._release(spare)
            return None
        self.spares_taken += 1
        return spare.held

    def _refill(self, slot: tuple[str, str, str], grant: Grant, spec: ModelSpec, want: int) -> None:
        if (
            not self.spare_holds
            or self._closing
            or slot in self._spares
            or slot in self._refills
            or len(self._spares) + len(self._refills) >= MAX_SPARES
        ):
            return
        task = asyncio.get_running_loop().create_task(self._place_spare(slot, grant, spec, want))
        self._refills[slot] = _Refill(task)
        task.add_done_callback(lambda _: self._refills.pop(slot, None))

    async def _place_spare(
        self, slot: tuple[str, str, str], grant: Grant, spec: ModelSpec, want: int
    ) -> None:
        # All of ``want`` or nothing: a spare never takes the last of a balance.
        request = HoldRequest(new_request_id(), grant.account, grant.key_hash, spec.id, want, want)
        await asyncio.sleep(OFF_PATH_SECONDS)
        try:
            outcome = await self.holds.hold(request)
        except Exception:
            log.exception("spare hold of %s not placed", grant.key_hash[:12])
            return
        if isinstance(outcome, UbcError):
            return
        spare = _Spare(outcome, grant, spec, self.clock.now())
        if self._closing or slot in self._spares:
            self._release(spare)
            return
        self._spares[slot] = spare
        spare.timer = asyncio.get_running_loop().call_later(
            SPARE_SECONDS, self._expire_spare, slot, spare
        )

    def _expire_spare(self, slot: tuple[str, str, str], spare: _Spare) -> None:
        if self._spares.get(slot) is spare:
            del self._spares[slot]
            self._release(spare)

    def _release_spares(self, account: str | None = None) -> None:
        """Release the spare holds of ``account`` (all of them when None)."""
        for slot in [s for s in self._spares if account is None or s[0] == account]:
            spare = self._spares.pop(slot)
            if spare.timer is not None:
                spare.timer.cancel()
            self._release(spare)

    def _release(self, spare: _Spare) -> None:
        call = Call(
            spare.held.request_id,
            spare.grant,
            spare.spec,
            self.prices.get(spare.spec.id, {"input": 0, "output": 0}),
            spare.held.amount,
            [],
            0,
        )
        self.finish(call, 0, 0, observe=False)

    async def close_spares(self) -> None:
        """Place no more spare holds and release those left (before the hold writer
        stops; their usage entries are written by :meth:`drain`)."""
        self._closing = True
        refills = [r.task for r in self._refills.values()]
        if refills:
            await asyncio.gather(*refills, return_exceptions=True)
        self._release_spares()

    def metered(
        self,
        grant: Grant,
        spec: ModelSpec,
        *,
        input_bound: int,
        output_cap: int,
        input_floor: int | None = None,
    ) -> Metered:
        """A metered call, to be used as ``async with gateway.metered(...) as m:``
        (:class:`Metered`; the hold is as :meth:`begin` places it)."""
        return Metered(self, grant, spec, input_bound, output_cap, input_floor)

    def finish(
        self, call: Call, input_tokens: int, output_tokens: int, *, observe: bool = True
    ) -> int:
        """Bill the call (0 tokens: release it unbilled); returns its cost. The usage
        entry is written by the group-commit writer after this returns."""
        if call.settled:
            return 0
        call.settled = True
        now = self.clock.now()
        cost = rules.call_cost(input_tokens, output_tokens, call.price, call.held)
        if observe:
            metrics.observe_billing(call.spec.id, input_tokens, output_tokens, cost)

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

        (self.shared_limiter or self.limiter).refund(
            call.limits, call.reserved_tokens - input_tokens - output_tokens
        )
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
        await self.close_spares()
        await self.drain()
        await self.upstreams.aclose()
        if self.shared_limiter is not None:
            await self.shared_limiter.aclose()
        self.cpu.shutdown()

    # -- internals --

    async def _settle(self, call: Call, item: Callable[[], Prechecked]) -> None:
        await asyncio.sleep(OFF_PATH_SECONDS)
        try:
            outcomes = await self.writer.submit_internal([item])
        except Exception:
            log.exception("usage of call %s not journaled; its hold will expire", call.request_id)
            return
        outcome = outcomes[0]
        if not isinstance(outcome, UbcError) and usage_log.isEnabledFor(logging.INFO):
            fields = {
                "call": call.request_id,
                "request_id": logs.current_request_id() or call.request_id,
                "account": call.grant.account,
                "model": call.spec.id,
                "seq": outcome.receipt.seq,
            }
            usage_log.info("usage of call %s journaled", call.request_id, extra={"fields": fields})
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
            account=row.account,
            scopes=frozenset(row.scopes.split(",")),
            models=frozenset(json.loads(row.models)) if row.models is not None else None,
            rpm=row.rpm,
            tpm=row.tpm,
            expires_at=row.expires_at,
            revoked=bool(row.revoked),
        )
