"""The Python client of a ubc ledger: build, sign and submit envelopes; read accounts.

One :class:`UbcClient` speaks for one signer. Give it a member's key and handle to act as
that member, or the operator's key and no handle to act as the operator; give it a
bearer ``token`` (an API key secret with the ``read`` scope, or an operator or auditor
token) to read. Every answer other than 2xx raises :class:`UbcApiError`; transport
failures raise ``httpx.TransportError`` after the retries.

Envelopes carry a client-chosen UUID, so resending one after a lost answer is safe: the
ledger answers the original result. The client does that by itself on transport errors.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NotRequired, Self, TypedDict, cast
from urllib.parse import quote

import httpx
from nacl.signing import SigningKey

from ubc import __version__
from ubc.signing import (
    Envelope,
    add_signature,
    canonical_json,
    encode_public_key,
    payload_type_for,
    sign_envelope,
)

__all__ = [
    "API_KEY_PREFIX",
    "Account",
    "ApiKeyInfo",
    "Balance",
    "BatchResult",
    "Cause",
    "DonationReceipt",
    "Effect",
    "HistoryItem",
    "HistoryPage",
    "LedgerAsset",
    "LedgerInfo",
    "LedgerModelPrice",
    "Member",
    "MemberKey",
    "Offer",
    "Receipt",
    "Transfer",
    "TransferLeg",
    "Trade",
    "UbcApiError",
    "UbcClient",
    "WithdrawalError",
    "WithdrawalRequest",
    "api_key_hash",
    "new_api_key_secret",
    "to_address",
]

API_KEY_PREFIX = "ubc_sk_"
DEFAULT_TIMEOUT = 10.0
#: Answered by every write: the journal's size once its entries are in.
JOURNAL_SIZE_HEADER = "UBC-Journal-Size"
#: Sent with every read after a write: a read replica that has not replayed that much
#: leaves the read to the primary (read-your-writes).
MIN_JOURNAL_SIZE_HEADER = "UBC-Min-Journal-Size"
_API_KEY_BYTES = 32


class UbcApiError(Exception):
    """The ledger answered with an error: its HTTP status and ``{type, message, detail}``."""

    def __init__(
        self, status: int, type: str, message: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})


# --- what the ledger answers (JSON objects, typed) ----------------------------------------


class Effect(TypedDict):
    """One ledger transfer an accepted envelope made."""

    transfer_id: str
    kind: str
    debit: str
    credit: str
    asset: str
    amount: int
    phase: str
    pending_id: NotRequired[str]


class Receipt(TypedDict):
    """The answer to an accepted envelope; ``seq`` is its journal entry."""

    seq: int
    id: str
    type: str
    effects: list[Effect]
    summary: NotRequired[dict[str, Any]]  # epoch.open and epoch.close


class LedgerAsset(TypedDict):
    scale: int


class LedgerModelPrice(TypedDict):
    input: int
    output: int


class LedgerInfo(TypedDict):
    origin: str
    vkey: str
    ledger_public_key: str
    operator_public_keys: list[str]
    assets: dict[str, LedgerAsset]
    enrollment: str
    market_fee_bps: int
    cu_price_usd: str
    models: dict[str, LedgerModelPrice]
    current_epoch: int | None


class Balance(TypedDict):
    asset: str
    posted: int
    pending_debits: int
    pending_credits: int
    available: int


class Account(TypedDict):
    address: str
    balances: list[Balance]


class HistoryItem(TypedDict):
    """One posting; ``amount`` is the signed change of this account's posted balance."""

    transfer_id: str
    kind: str
    phase: str
    asset: str
    amount: int
    pending: int
    counterparty: str
    balance_after: int
    available_after: int
    memo: str | None
    created_at: str


class HistoryPage(TypedDict):
    address: str
    items: list[HistoryItem]
    next_cursor: str | None


class ApiKeyInfo(TypedDict):
    """An API key granted on an account (its hash, never its secret) and what it spent:
    ``calls`` and ``spent`` in all, ``spent_in_epoch`` in ``epoch`` (the latest)."""

    key_hash: str
    label: str
    scopes: list[str]
    spend_cap_per_epoch: int | None
    models: list[str] | None
    expires_at: str | None
    rpm: int | None
    tpm: int | None
    granted_by: str
    revoked: bool
    created_at: str
    calls: int
    spent: int
    epoch: int | None
    spent_in_epoch: int


class MemberKey(TypedDict):
    keyid: str
    public_key: str
    current: bool


class Member(TypedDict):
    handle: str
    address: str
    status: str
    tier: str | None
    display_name: str | None
    created_at: str
    keys: list[MemberKey]


class TransferLeg(TypedDict):
    transfer_id: str
    kind: str
    phase: str
    debit: str
    credit: str
    asset: str
    amount: int
    pending_id: str | None
    state: str | None
    memo: str | None
    created_at: str


class Transfer(TypedDict):
    id: str
    transfers: list[TransferLeg]


class Cause(TypedDict):
    """A cause: stewards, balances, and per asset what it received and spent."""

    slug: str
    address: str
    name: str
    description: str
    stewards: list[str]
    created_at: str
    updated_at: str
    balances: dict[str, int]
    donated: dict[str, int]
    donors: int
    spent: dict[str, int]
    used_on_models: dict[str, int]
    sent: dict[str, int]


class DonationReceipt(TypedDict):
    id: str
    transfer_id: str
    seq: int | None
    cause: str
    asset: str
    amount: int
    memo: str | None
    created_at: str


class Offer(TypedDict):
    """An offer; ``remaining_price`` is what its ``remaining_amount`` units cost together."""

    id: str
    seller: str
    sell_asset: str
    sell_amount: int
    price_asset: str
    price_amount: int
    remaining_amount: int
    remaining_price: int
    sold: int
    status: str
    expires_at: str | None
    created_at: str
    closed_at: str | None
    closed_by: str | None


class Trade(TypedDict):
    """One fill; ``side`` (buy or sell) when read for one account."""

    id: str
    seq: int
    offer_id: str
    seller: str
    buyer: str
    sell_asset: str
    amount: int
    price_asset: str
    payment: int
    fee: int
    created_at: str
    side: NotRequired[str]


class WithdrawalError(TypedDict):
    type: str | None
    message: str | None


class WithdrawalRequest(TypedDict):
    """A withdrawal its owner signed; ``status`` pending, done or failed."""

    id: str
    account: str
    asset: str
    amount: int
    external_ref: str
    envelope: dict[str, Any]
    created_at: str
    status: str
    error: NotRequired[WithdrawalError | None]  # only when failed


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of one envelope of a batch: a receipt, or the error (not raised)."""

    index: int
    status: int
    receipt: Receipt | None
    error: UbcApiError | None

    @property
    def ok(self) -> bool:
        return self.error is None


# --- helpers anyone may use ---------------------------------------------------------------


def to_address(name: str) -> str:
    """A full address: ``alice`` → ``member:alice``; full addresses are kept as they are."""
    return name if ":" in name else f"member:{name}"


def new_api_key_secret() -> str:
    """A new API key secret: ``ubc_sk_`` + 32 random bytes, urlsafe base64 without padding."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(_API_KEY_BYTES)).rstrip(b"=")
    return API_KEY_PREFIX + body.decode("ascii")


def api_key_hash(secret: str) -> str:
    """What the ledger stores of an API key: hex SHA-256 of the whole secret string."""
    return hashlib.sha256(secret.encode()).hexdigest()


# --- the client ---------------------------------------------------------------------------


class UbcClient:
    """A synchronous client of one ubc ledger, signing as one member or as the operator.

    ``origin`` is fetched from ``GET /api/ledger`` on first use unless given. ``key`` signs
    every envelope; ``handle`` makes the client act as ``member:<handle>`` (without one it
    acts as the operator). ``token`` authenticates reads. ``transport`` replaces the
    network, e.g. with ``httpx.MockTransport`` in tests. Envelope submissions are resent
    up to ``retries`` times on transport errors (safe: envelope ids are idempotency keys).

    Reads see this client's own writes, also where a read replica serves reads: every
    read sends the journal size the client's latest write produced
    (:attr:`journal_size`); hand it to another client (``other.journal_size =
    this.journal_size``) for that one to see them too.
    """

    def __init__(
        self,
        base_url: str,
        *,
        origin: str | None = None,
        key: SigningKey | None = None,
        handle: str | None = None,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = 2,
    ) -> None:
        self.key = key
        self.handle = handle
        self.token = token
        self.retries = retries
        self._origin = origin
        self.journal_size: int | None = None
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": f"ubc-client/{__version__}"},
        )

    # --- lifecycle ---

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    @property
    def origin(self) -> str:
        """The ledger origin every payload names (fetched once from ``/api/ledger``)."""
        if self._origin is None:
            self._origin = self.ledger_info()["origin"]
        return self._origin

    @property
    def actor(self) -> str:
        """``member:<handle>``, or ``operator`` for a client without a handle."""
        return f"member:{self.handle}" if self.handle else "operator"

    @property
    def address(self) -> str:
        """This member's account address."""
        return f"member:{self._require_handle()}"

    # --- building and signing ---

    def envelope(
        self,
        type_: str,
        /,
        *,
        keys: Sequence[SigningKey] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A signed envelope of payload type ``type_`` (e.g. ``"transfer"``) as a JSON dict.

        Fills ``ledger``, ``id`` (a new UUID), ``created_at`` (now) and ``actor`` unless
        given; ``from_`` stands for ``from``; fields that are None are left out. Signed by
        ``keys``, or by this client's key.
        """
        payload: dict[str, Any] = {
            "ledger": self.origin,
            "id": str(uuid.uuid4()),
            "created_at": format_timestamp(datetime.now(UTC)),
            "actor": self.actor,
        }
        for name, value in fields.items():
            payload["from" if name == "from_" else name] = value
        body = canonical_json({k: v for k, v in payload.items() if v is not None})
        signers = list(keys) if keys is not None else [self._require_key()]
        return sign_envelope(payload_type_for(type_), body, signers).to_json()

    def cosign(self, envelope: Mapping[str, Any] | Envelope) -> dict[str, Any]:
        """``envelope`` with this client's signature added (e.g. the operator's on a
        withdrawal the owner signed)."""
        parsed = envelope if isinstance(envelope, Envelope) else Envelope.from_json(envelope)
        return add_signature(parsed, self._require_key()).to_json()

    # --- submitting ---

    def submit(self, envelope: Mapping[str, Any] | Envelope) -> Receipt:
        """Submit one envelope; its receipt (the same one again for a replay)."""
        body = envelope.to_json() if isinstance(envelope, Envelope) else dict(envelope)
        return cast(Receipt, self._post("/api/envelopes", body))

    def submit_batch(
        self, envelopes: Sequence[Mapping[str, Any] | Envelope], *, atomic: bool = False
    ) -> list[BatchResult]:
        """Submit up to 1,000 envelopes at once; one result per envelope, in order.

        An atomic batch applies whole or raises :class:`UbcApiError` (409, ``detail["index"]``
        naming the failing envelope) and applies nothing.
        """
        items = [e.to_json() if isinstance(e, Envelope) else dict(e) for e in envelopes]
        answer = self._post("/api/envelopes/batch", {"atomic": atomic, "envelopes": items})
        results = []
        for result in answer["results"]:
            status: int = result["status"]
            body: dict[str, Any] = result["body"]
            if 200 <= status < 300:
                results.append(BatchResult(result["index"], status, cast(Receipt, body), None))
            else:
                results.append(BatchResult(result["index"], status, None, _error(status, body)))
        return results

    # --- members ---

    def register(self, handle: str | None = None, display_name: str | None = None) -> Receipt:
        """Register this client's key as ``member:<handle>``; the client then acts as it."""
        handle = handle or self._require_handle()
        key = self._require_key()
        receipt = self.submit(
            self.envelope(
                "member.register",
                actor=f"member:{handle}",
                handle=handle,
                public_key=encode_public_key(bytes(key.verify_key)),
                display_name=display_name,
            )
        )
        self.handle = handle
        return receipt

    def rotate_key(self, new_key: SigningKey) -> Receipt:
        """Replace this member's key by ``new_key`` (signed by both); the client then signs
        with ``new_key``."""
        handle = self._require_handle()
        receipt = self.submit(
            self.envelope(
                "key.rotate",
                keys=[self._require_key(), new_key],
                handle=handle,
                new_public_key=encode_public_key(bytes(new_key.verify_key)),
            )
        )
        self.key = new_key
        return receipt

    def grant_api_key(
        self,
        label: str,
        scopes: Sequence[str] = ("models", "read"),
        account: str | None = None,
        spend_cap_per_epoch: int | None = None,
        models: Sequence[str] | None = None,
        expires_at: datetime | str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[str, Receipt]:
        """Grant a new API key on this member's account (or ``account``).

        Returns the secret, which the ledger never sees (only its SHA-256), and the receipt.
        """
        secret = new_api_key_secret()
        if isinstance(expires_at, datetime):
            expires_at = format_timestamp(expires_at)
        receipt = self.submit(
            self.envelope(
                "apikey.grant",
                account=to_address(account) if account else self.address,
                key_hash=api_key_hash(secret),
                label=label,
                scopes=list(scopes),
                spend_cap_per_epoch=spend_cap_per_epoch,
                models=list(models) if models is not None else None,
                expires_at=expires_at,
                rpm=rpm,
                tpm=tpm,
            )
        )
        return secret, receipt

    def api_keys(self, account: str | None = None) -> list[ApiKeyInfo]:
        """The API keys granted on ``account`` (default: this member), oldest first, with
        what each spent (needs a token that may read the account)."""
        path = f"/api/accounts/{_path(self._address_or_own(account))}/apikeys"
        return cast(list[ApiKeyInfo], self._get(path)["apikeys"])

    def revoke_api_key(self, key_hash: str, account: str | None = None) -> Receipt:
        """Revoke the API key whose hash is ``key_hash`` (see :func:`api_key_hash`)."""
        return self.submit(
            self.envelope(
                "apikey.revoke",
                account=to_address(account) if account else self.address,
                key_hash=key_hash,
            )
        )

    # --- moving value ---

    def send(self, to: str, amount: int, *, asset: str = "CU", memo: str | None = None) -> Receipt:
        """Transfer ``amount`` of ``asset`` to ``to`` (a handle or a full address)."""
        return self.submit(
            self.envelope(
                "transfer",
                from_=self.address,
                to=to_address(to),
                asset=asset,
                amount=amount,
                memo=memo,
            )
        )

    def donate(
        self, cause_slug: str, amount: int, memo: str | None = None, *, asset: str = "CU"
    ) -> Receipt:
        """Transfer ``amount`` to the cause ``cause_slug`` (or ``cause:<slug>``)."""
        cause = cause_slug if cause_slug.startswith("cause:") else f"cause:{cause_slug}"
        return self.send(cause, amount, asset=asset, memo=memo)

    def withdrawal_envelope(
        self,
        amount: int,
        *,
        external_ref: str,
        asset: str = "CU",
        account: str | None = None,
    ) -> dict[str, Any]:
        """A withdrawal from this member's account, signed by the owner; the operator must
        :meth:`cosign` it before it is submitted."""
        return self.envelope(
            "withdrawal",
            from_=to_address(account) if account else self.address,
            asset=asset,
            amount=amount,
            external_ref=external_ref,
        )

    def request_withdrawal(self, envelope: Mapping[str, Any] | Envelope) -> WithdrawalRequest:
        """Leave a withdrawal signed by its owner with the ledger, for the operator to
        countersign (:meth:`approve_withdrawal`); nothing moves yet."""
        body = envelope.to_json() if isinstance(envelope, Envelope) else dict(envelope)
        return cast(WithdrawalRequest, self._post("/api/withdrawals", body))

    def withdraw(self, amount: int, *, external_ref: str, asset: str = "USD") -> WithdrawalRequest:
        """Ask for a withdrawal from this member's account (signed by the member only)."""
        return self.request_withdrawal(
            self.withdrawal_envelope(amount, external_ref=external_ref, asset=asset)
        )

    # --- the market ---

    def sell(
        self,
        amount: int,
        price: int,
        *,
        asset: str = "CU",
        price_asset: str = "USD",
        expires_at: datetime | str | None = None,
    ) -> Receipt:
        """Offer ``amount`` of ``asset`` for ``price`` of ``price_asset`` in all; the units
        move to escrow at once. The offer's id is the receipt's ``id``."""
        if isinstance(expires_at, datetime):
            expires_at = format_timestamp(expires_at)
        return self.submit(
            self.envelope(
                "offer.create",
                sell_asset=asset,
                sell_amount=amount,
                price_asset=price_asset,
                price_amount=price,
                expires_at=expires_at,
            )
        )

    def buy(self, offer_id: str, amount: int | None = None) -> Receipt:
        """Fill ``amount`` units of an offer (default: all that is left)."""
        if amount is None:
            amount = self.offer(offer_id)["remaining_amount"]
        return self.submit(self.envelope("offer.fill", offer_id=offer_id, amount=amount))

    def cancel_offer(self, offer_id: str) -> Receipt:
        """Cancel this member's offer; what is left comes back from escrow."""
        return self.submit(self.envelope("offer.cancel", offer_id=offer_id))

    def offers(
        self,
        *,
        sell_asset: str | None = None,
        price_asset: str | None = None,
        seller: str | None = None,
        limit: int = 100,
    ) -> list[Offer]:
        """Open offers, best unit price first."""
        params: dict[str, str | int] = {"limit": limit}
        for name, value in (
            ("sell_asset", sell_asset),
            ("price_asset", price_asset),
            ("seller", to_address(seller) if seller else None),
        ):
            if value is not None:
                params[name] = value
        return cast(list[Offer], self._get("/api/market/offers", params=params)["offers"])

    def offer(self, offer_id: str) -> Offer:
        return cast(Offer, self._get(f"/api/market/offers/{_path(offer_id)}"))

    def trades(
        self, account: str | None = None, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Trade], str | None]:
        """Fills ``account`` (default: this member; the operator may pass ``"*"`` for all)
        bought or sold, newest first, and the cursor of the next page."""
        params: dict[str, str | int] = {"limit": limit}
        if account != "*":
            params["account"] = self._address_or_own(account)
        if cursor is not None:
            params["cursor"] = cursor
        answer = self._get("/api/market/trades", params=params)
        return cast(list[Trade], answer["trades"]), answer["next_cursor"]

    # --- causes ---

    def causes(self) -> list[Cause]:
        return cast(list[Cause], self._get("/api/causes")["causes"])

    def cause(self, slug: str) -> Cause:
        return cast(Cause, self._get(f"/api/causes/{_path(slug.removeprefix('cause:'))}"))

    def donations(
        self, address: str | None = None, *, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[DonationReceipt], str | None]:
        """Donation receipts of an account (default: this member), newest first."""
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        path = f"/api/accounts/{_path(self._address_or_own(address))}/donations"
        answer = self._get(path, params=params)
        return cast(list[DonationReceipt], answer["donations"]), answer["next_cursor"]

    def register_cause(
        self, slug: str, name: str, description: str, stewards: Sequence[str]
    ) -> Receipt:
        """Register a cause with its steward members (operator)."""
        return self.submit(
            self.envelope(
                "cause.register",
                actor="operator",
                slug=slug,
                name=name,
                description=description,
                stewards=list(stewards),
            )
        )

    def update_cause(
        self, slug: str, name: str, description: str, stewards: Sequence[str]
    ) -> Receipt:
        """Replace a cause's name, description and stewards (operator)."""
        return self.submit(
            self.envelope(
                "cause.update",
                actor="operator",
                slug=slug,
                name=name,
                description=description,
                stewards=list(stewards),
            )
        )

    # --- the operator ---

    def withdrawals(
        self, status: str | None = "pending", account: str | None = None, limit: int = 100
    ) -> list[WithdrawalRequest]:
        """Withdrawals members asked for (operator token; a member: ``account`` = its own)."""
        params: dict[str, str | int] = {"limit": limit}
        if status is not None:
            params["status"] = status
        if account is not None:
            params["account"] = to_address(account)
        answer = self._get("/api/withdrawals", params=params)
        return cast(list[WithdrawalRequest], answer["withdrawals"])

    def withdrawal(self, withdrawal_id: str) -> WithdrawalRequest:
        return cast(WithdrawalRequest, self._get(f"/api/withdrawals/{_path(withdrawal_id)}"))

    def approve_withdrawal(self, withdrawal_id: str) -> Receipt:
        """Countersign a pending withdrawal with this client's (the operator's) key and
        submit it; the value leaves the member's account now."""
        item = self.withdrawal(withdrawal_id)
        if item["status"] != "pending":
            raise UbcApiError(
                409,
                "state_conflict",
                f"withdrawal {withdrawal_id} is {item['status']}",
                {"id": withdrawal_id, "status": item["status"]},
            )
        return self.submit(self.cosign(item["envelope"]))

    # --- the operator ---

    def admit(self, handle: str, tier: str) -> Receipt:
        """Admit a registered member into ``tier`` (operator)."""
        return self.submit(
            self.envelope("member.admit", actor="operator", handle=handle, tier=tier)
        )

    def update_member(
        self,
        handle: str,
        tier: str | None = None,
        status: str | None = None,
        reason: str | None = None,
    ) -> Receipt:
        """Change a member's tier, or suspend (``status="suspended"``) or reinstate it."""
        return self.submit(
            self.envelope(
                "member.update",
                actor="operator",
                handle=handle,
                tier=tier,
                status=status,
                reason=reason,
            )
        )

    def deposit(self, to: str, amount: int, asset: str = "CU", *, external_ref: str) -> Receipt:
        """Credit ``to`` with value that entered from outside (operator); idempotent on
        ``external_ref``."""
        return self.submit(
            self.envelope(
                "deposit",
                actor="operator",
                to=to_address(to),
                asset=asset,
                amount=amount,
                external_ref=external_ref,
            )
        )

    # --- reads ---

    def ledger_info(self) -> LedgerInfo:
        """The ledger's public facts: origin, keys, assets, enrollment, current epoch."""
        info = cast(LedgerInfo, self._get("/api/ledger"))
        self._origin = self._origin or info["origin"]
        return info

    def member(self, handle: str | None = None) -> Member:
        return cast(Member, self._get(f"/api/members/{_path(handle or self._require_handle())}"))

    def balance(self, address: str | None = None) -> Account:
        """Balances per asset of ``address`` (a handle or address; default: this member)."""
        return cast(Account, self._get(f"/api/accounts/{_path(self._address_or_own(address))}"))

    def history(
        self,
        address: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
        asset: str | None = None,
    ) -> HistoryPage:
        """One page of postings, newest first; pass ``next_cursor`` for the next page."""
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        if asset is not None:
            params["asset"] = asset
        path = f"/api/accounts/{_path(self._address_or_own(address))}/history"
        return cast(HistoryPage, self._get(path, params=params))

    def iter_history(
        self, address: str | None = None, *, asset: str | None = None, page_size: int = 200
    ) -> Iterator[HistoryItem]:
        """Every posting of an account, newest first, fetched page by page."""
        cursor: str | None = None
        while True:
            page = self.history(address, cursor=cursor, limit=page_size, asset=asset)
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def utilization(
        self,
        epoch: int,
        *,
        below: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """One page of an epoch's utilization report (operator and auditors): members in
        address order, ``totals`` on the first page; pass ``next_cursor`` for the next."""
        params: dict[str, str | int] = {"epoch": epoch}
        if below is not None:
            params["below"] = below
        if cursor is not None:
            params["cursor"] = cursor
        if limit is not None:
            params["limit"] = limit
        page: dict[str, Any] = self._get("/api/reports/utilization", params=params)
        return page

    def iter_utilization_csv(self, epoch: int) -> Iterator[str]:
        """The whole utilization report of an epoch as CSV text, piece by piece as the
        server streams it: a header, a row per member in address order, a ``total`` row."""
        with self._http.stream(
            "GET",
            "/api/reports/utilization",
            params={"epoch": epoch},
            headers={**self._read_headers(), "Accept": "text/csv"},
        ) as response:  # the timeout bounds each read, not the whole answer
            if not response.is_success:
                response.read()
                _raise_for_error(response)
            yield from response.iter_text()

    def transfer(self, id: str) -> Transfer:
        """A transfer (``<envelope id>:<n>``) or every leg an envelope made (its id)."""
        return cast(Transfer, self._get(f"/api/transfers/{_path(id)}"))

    def checkpoint(self) -> str:
        """The journal's latest signed checkpoint (a C2SP signed note)."""
        response = self._http.get("/journal/checkpoint", headers=self._read_headers())
        _raise_for_error(response)
        return response.text

    # --- internals ---

    def _require_key(self) -> SigningKey:
        if self.key is None:
            raise ValueError("this client has no signing key")
        return self.key

    def _require_handle(self) -> str:
        if not self.handle:
            raise ValueError("this client has no member handle")
        return self.handle

    def _address_or_own(self, address: str | None) -> str:
        return to_address(address) if address else self.address

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _get(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        response = self._http.get(path, params=params, headers=self._read_headers())
        _raise_for_error(response)
        return response.json()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.post(path, json=body)
                break
            except httpx.TransportError:
                # The same envelope ids again: the ledger answers what it already did.
                if attempt >= self.retries:
                    raise
                attempt += 1
        self._saw_journal_size(response)
        _raise_for_error(response)
        return response.json()

    def _read_headers(self) -> dict[str, str]:
        headers = self._headers()
        if self.journal_size is not None:
            headers[MIN_JOURNAL_SIZE_HEADER] = str(self.journal_size)
        return headers

    def _saw_journal_size(self, response: httpx.Response) -> None:
        """Remember the journal size a write produced (the largest seen)."""
        value = response.headers.get(JOURNAL_SIZE_HEADER, "")
        if value.isascii() and value.isdigit():
            self.journal_size = max(self.journal_size or 0, int(value))


def _path(segment: str) -> str:
    return quote(segment, safe=":")


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise _error(response.status_code, body, fallback=response.text or response.reason_phrase)


def _error(status: int, body: object, *, fallback: str = "") -> UbcApiError:
    """The error of an answer: the ledger's ``{"error": {...}}`` body, or what there is."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            detail = error.get("detail")
            return UbcApiError(
                status,
                str(error.get("type", "error")),
                str(error.get("message", "")),
                detail if isinstance(detail, dict) else {},
            )
        if "detail" in body:  # FastAPI's own answers, e.g. an unknown path
            return UbcApiError(status, "http_error", str(body["detail"]), {})
    return UbcApiError(status, "http_error", fallback or f"HTTP {status}", {})


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, as payloads carry it (``ubc.rules.payload``; the
    client imports no server module)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
