"""The console's signing pages: forms whose envelopes are signed in the browser.

Every page here is a form; the browser's JavaScript (``static/js/actions.js``, on top of
``static/js/ubc.js``) builds the payload, signs it with the key the browser holds
(WebCrypto Ed25519, non-extractable) and posts the envelope to the ordinary API
(``POST /api/envelopes``, ``POST /api/withdrawals``). The server renders the forms and
never sees a private key: these routes take no input but query parameters that prefill
fields, and they change nothing.

The pages know who is signed in (the session cookie of ``ubc.console.web``): a member's
signing pages name the signed-in handle (and ``actions.js`` warns when the key held by
this browser is another member's); the countersign page lists the pending withdrawals,
read on the server through the operator's session, so no token is ever typed into a page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ubc.console.operator import operator_page
from ubc.console.web import SignedIn, page, signed_in
from ubc.deps import ReadSession
from ubc.market import service as market

__all__ = ["ACTIONS", "Action", "Field", "router"]

router = APIRouter(include_in_schema=False)

Kind = Literal["text", "number", "textarea", "select", "checkboxes", "datetime", "password"]


@dataclass(frozen=True, slots=True)
class Field:
    """One labelled field of a form; ``name`` is what actions.js reads."""

    name: str
    label: str
    kind: Kind = "text"
    required: bool = True
    help: str = ""
    choices: tuple[str, ...] = ()
    default: str = ""
    pattern: str | None = None
    minimum: int | None = None


@dataclass(frozen=True, slots=True)
class Action:
    """A page with one form whose envelope the browser signs as ``role``."""

    name: str
    path: str
    title: str
    intro: str
    role: Literal["member", "operator"]
    submit: str
    fields: tuple[Field, ...]


_HANDLE = "[a-z0-9_\\-]{3,32}"
_ASSET = Field("asset", "Asset", default="CU", help="CU for compute units, USD in cents")


def _amount(name: str = "amount", label: str = "Amount") -> Field:
    return Field(name, label, "number", minimum=1, help="a whole number")


_MEMBER: tuple[Action, ...] = (
    Action(
        "send",
        "/me/send",
        "Send",
        "Move value from your account to another member's.",
        "member",
        "Sign and send",
        (
            Field("to", "To (member handle)", help="e.g. bob, or member:bob"),
            _ASSET,
            _amount(),
            Field("memo", "Memo", required=False, help="up to 256 characters, kept with it"),
            Field(
                "from",
                "From",
                required=False,
                help="empty: your account; or cause:<slug> of a cause you steward",
            ),
        ),
    ),
    Action(
        "donate",
        "/me/donate",
        "Donate",
        "Give value to a cause.",
        "member",
        "Sign and donate",
        (
            Field("cause", "Cause (slug)", help="e.g. malaria-research"),
            _ASSET,
            _amount(),
            Field("memo", "Memo", required=False),
        ),
    ),
    Action(
        "sell",
        "/me/sell",
        "Sell",
        "Offer units on the market. They go to escrow at once; buyers pay the total price "
        "(or its share for part of it).",
        "member",
        "Sign and offer",
        (
            Field("sell_asset", "Asset to sell", default="CU"),
            _amount("sell_amount", "Amount to sell"),
            Field("price_asset", "Paid in", default="USD", help="USD is in cents"),
            _amount("price_amount", "Price of the whole offer"),
            Field(
                "expires_at",
                "Expires at",
                "datetime",
                required=False,
                help="optional; after it the offer cannot be bought",
            ),
        ),
    ),
    Action(
        "buy",
        "/me/buy",
        "Buy",
        "Buy units of an open offer.",
        "member",
        "Sign and buy",
        (Field("offer_id", "Offer id"), _amount("amount", "Units to buy")),
    ),
    Action(
        "cancel",
        "/me/cancel",
        "Cancel an offer",
        "Cancel one of your open offers; what is unsold comes back from escrow.",
        "member",
        "Sign and cancel",
        (Field("offer_id", "Offer id"),),
    ),
    Action(
        "grant",
        "/me/keys/grant",
        "New API key",
        "Make an API key for the model endpoint and for reading your account. The secret "
        "is made in this browser and shown once; the ledger only ever sees its hash.",
        "member",
        "Sign and grant",
        (
            Field("label", "Label", help="a name for the key, 1 to 64 characters"),
            Field(
                "scopes", "Scopes", "checkboxes", choices=("models", "read"), default="models read"
            ),
            Field("spend_cap_per_epoch", "Spend cap per epoch", "number", required=False),
            Field(
                "models", "Models", required=False, help="model ids separated by commas; empty: all"
            ),
            Field("expires_at", "Expires at", "datetime", required=False),
            Field("rpm", "Requests per minute", "number", required=False),
            Field("tpm", "Tokens per minute", "number", required=False),
        ),
    ),
    Action(
        "revoke",
        "/me/keys/revoke",
        "Revoke an API key",
        "The key stops working at once.",
        "member",
        "Sign and revoke",
        (
            Field(
                "key_hash",
                "Key hash or secret",
                help="the 64-hex hash shown in your keys list, or the ubc_sk_ secret itself",
            ),
        ),
    ),
    Action(
        "rotate",
        "/me/keys/rotate",
        "Replace your signing key",
        "Make a new signing key in this browser and make it your key on the ledger "
        "(signed by the old and the new key). The old key stops working at once.",
        "member",
        "Sign and replace",
        (
            Field(
                "confirm",
                "Replace my key",
                "checkboxes",
                choices=("yes",),
                help="the old key, and any copy of its key file, stop working",
            ),
        ),
    ),
    Action(
        "withdraw",
        "/me/withdraw",
        "Withdraw",
        "Ask for value to leave the ledger (e.g. USD paid out to you). You sign it here; "
        "the operator countersigns when it pays out, and only then does the value move.",
        "member",
        "Sign and ask",
        (
            Field("asset", "Asset", default="USD"),
            _amount(),
            Field("external_ref", "Payout reference", help="e.g. your bank transfer reference"),
        ),
    ),
)

_OPERATOR: tuple[Action, ...] = (
    Action(
        "admit",
        "/operator/act/admit",
        "Admit a member",
        "Admit a registered member into a tier.",
        "operator",
        "Sign and admit",
        (Field("handle", "Member handle", pattern=_HANDLE), Field("tier", "Tier")),
    ),
    Action(
        "suspend",
        "/operator/act/suspend",
        "Suspend a member",
        "A suspended member signs nothing and its API keys stop working.",
        "operator",
        "Sign and suspend",
        (
            Field("handle", "Member handle", pattern=_HANDLE),
            Field("reason", "Reason", required=False),
        ),
    ),
    Action(
        "reinstate",
        "/operator/act/reinstate",
        "Reinstate a member",
        "Make a suspended member active again.",
        "operator",
        "Sign and reinstate",
        (
            Field("handle", "Member handle", pattern=_HANDLE),
            Field("reason", "Reason", required=False),
        ),
    ),
    Action(
        "tier",
        "/operator/act/tier",
        "Change a member's tier",
        "The next epoch allocates by the new tier.",
        "operator",
        "Sign and change",
        (
            Field("handle", "Member handle", pattern=_HANDLE),
            Field("tier", "New tier"),
            Field("reason", "Reason", required=False),
        ),
    ),
    Action(
        "epoch-open",
        "/operator/act/epoch-open",
        "Open an epoch",
        "Allocate to every active member of the listed tiers.",
        "operator",
        "Sign and open",
        (
            Field("epoch", "Epoch number", "number", minimum=1),
            Field("asset", "Asset", default="CU"),
            Field(
                "allocations",
                "Allocations",
                "textarea",
                help="one TIER=AMOUNT per line, e.g. basic=100",
            ),
            Field(
                "carryover_cap",
                "Carryover cap",
                "number",
                required=False,
                help="at the close, balances above it expire; empty: nothing expires",
            ),
            Field("starts_at", "Starts at", "datetime", required=False, help="empty: now"),
            Field("ends_at", "Ends at", "datetime", required=False, help="empty: 30 days later"),
        ),
    ),
    Action(
        "epoch-close",
        "/operator/act/epoch-close",
        "Close an epoch",
        "Balances above the epoch's carryover cap expire.",
        "operator",
        "Sign and close",
        (Field("epoch", "Epoch number", "number", minimum=1),),
    ),
    Action(
        "cause-register",
        "/operator/act/cause-register",
        "Register a cause",
        "A cause receives donations; its stewards spend for it.",
        "operator",
        "Sign and register",
        (
            Field("slug", "Slug", help="its account is cause:<slug>"),
            Field("name", "Name"),
            Field("description", "Description", "textarea", required=False),
            Field("stewards", "Stewards", help="member handles separated by commas"),
        ),
    ),
    Action(
        "cause-update",
        "/operator/act/cause-update",
        "Update a cause",
        "Replaces the name, the description and the whole list of stewards.",
        "operator",
        "Sign and update",
        (
            Field("slug", "Slug"),
            Field("name", "Name"),
            Field("description", "Description", "textarea", required=False),
            Field("stewards", "Stewards", help="member handles separated by commas"),
        ),
    ),
    Action(
        "countersign",
        "/operator/act/countersign",
        "Countersign a withdrawal",
        "Choose a withdrawal a member signed, add the operator's signature and submit it: "
        "the value leaves the member's account now.",
        "operator",
        "Countersign and submit",
        (Field("id", "Withdrawal id", help="choose one below, or paste its id"),),
    ),
    Action(
        "deposit",
        "/operator/act/deposit",
        "Deposit",
        "Credit an account with value that entered from outside (idempotent on the reference).",
        "operator",
        "Sign and deposit",
        (
            Field("to", "To (member handle or cause:slug)"),
            _ASSET,
            _amount(),
            Field("external_ref", "External reference"),
        ),
    ),
)

ACTIONS: tuple[Action, ...] = _MEMBER + _OPERATOR


def _form_page(action: Action) -> Callable[[Request], Response]:
    def show(request: Request) -> Response:
        query = request.query_params
        values = {f.name: query.get(f.name, f.default) for f in action.fields}
        if "handle" in values and "member" in query and "handle" not in query:
            values["handle"] = query["member"]  # /operator/act/admit?member=alice
        return page(request, "actions/form.html", action=action, values=values)

    show.__name__ = f"action_{action.name.replace('-', '_')}"
    return show


for _action in ACTIONS:
    if _action.name == "countersign":
        continue  # its own page below: it reads the pending withdrawals
    router.add_api_route(
        _action.path, _form_page(_action), methods=["GET"], response_class=HTMLResponse
    )


PENDING_ROWS = 100
COUNTERSIGN = next(a for a in ACTIONS if a.name == "countersign")


@router.get(COUNTERSIGN.path, response_class=HTMLResponse)
def countersign_page(request: Request, session: ReadSession) -> Response:
    """The pending withdrawals, read on the server through the operator's session (no
    token typed into the page), each with the envelope the member signed; the browser
    adds the operator key's signature to the chosen one and submits it."""

    def build(_: SignedIn) -> dict[str, Any]:
        pending = market.list_withdrawals(
            session, status="pending", account=None, limit=PENDING_ROWS
        )
        values = {"id": request.query_params.get("id", "")}
        return {"action": COUNTERSIGN, "values": values, "pending": pending}

    return operator_page(request, session, "actions/countersign.html", build)


@router.get("/key", response_class=HTMLResponse)
def key_page(request: Request, session: ReadSession) -> Response:
    """The keys this browser holds: import the CLI's key file or make one; forget it. The
    handle is prefilled from the query, else from the signed-in member."""
    reader = signed_in(request, session)
    account = (reader.account if reader is not None else None) or ""
    handle = request.query_params.get("handle") or (
        account.removeprefix("member:") if account.startswith("member:") else ""
    )
    return page(request, "actions/key.html", reader=reader, handle=handle)


@router.get("/register", response_class=HTMLResponse)
def register_page(request: Request) -> Response:
    """A new member registers; the key is made (or imported) in the browser."""
    return page(request, "actions/register.html", handle=request.query_params.get("handle", ""))
