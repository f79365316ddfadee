"""HTTP: checkpoint, tlog-tiles, entries and proofs of the journal (DESIGN section 5).

Checkpoints, hash tiles and proofs are public. Entry contents (entries and entry
bundles) are for the operator, auditors and, for its own entries, each member, unless
``UBC_JOURNAL_ACCESS=public``.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel
from pydantic import Field as PydanticField

from ubc.auth import Principal, authenticate_bearer
from ubc.deps import Bearer, PrimaryReadSession, ReadSession
from ubc.errors import BadRequest, Forbidden, NotFound
from ubc.journal import cosignatures, store
from ubc.journal.merkle import consistency_proof, inclusion_proof, leaf_hash
from ubc.journal.schemas import ConsistencyProof, InclusionProof, JournalEntries
from ubc.journal.stream import router as stream_router
from ubc.journal.tiles import (
    TILE_WIDTH,
    entry_bundle,
    parse_entries_path,
    parse_tile_path,
    tile_bytes,
    tile_exists,
)
from ubc.params import MAX_DB_INT
from ubc.rules.payload import format_timestamp
from ubc.schemas import error_responses

router = APIRouter(tags=["journal"])

MAX_ENTRIES_PAGE = 1000
IMMUTABLE = "public, max-age=31536000, immutable"
# A bearer is optional here: without one the route answers what is public; one that is
# sent must be valid (401). Added to the scheme FastAPI lists for the Bearer dependency.
OPTIONAL_BEARER: dict[str, Any] = {"security": [{}]}


@router.get(
    "/journal/checkpoint",
    summary="The latest C2SP tlog-checkpoint, a signed note, with the witnesses' cosignatures",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "the signed note (text/plain): the ledger's signature line, then "
            "the cosignature lines its witnesses gave for this very checkpoint, if any"
        },
        **error_responses(),
    },
)
def get_checkpoint(request: Request, session: ReadSession) -> PlainTextResponse:
    size, checkpoint = store.latest_checkpoint(session)
    witnessing = _witnessing(request)
    if witnessing is not None:
        checkpoint = cosignatures.with_cosignatures(session, size, checkpoint, witnessing.vkeys)
    return PlainTextResponse(checkpoint, headers={"Cache-Control": "no-cache"})


@router.get(
    "/journal/checkpoint/cosigned",
    summary="The largest checkpoint a quorum of the ledger's witnesses cosigned",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "the signed note (text/plain) with the cosignature lines: it "
            "may be older than the latest checkpoint (witnesses are asked in rounds)"
        },
        **error_responses(
            404, notes={404: "no witness is configured, or no checkpoint has a quorum yet"}
        ),
    },
)
def get_cosigned_checkpoint(request: Request, session: ReadSession) -> PlainTextResponse:
    witnessing = _witnessing(request)
    if witnessing is None:
        raise NotFound("this ledger has no witnesses (UBC_WITNESSES)")
    found = cosignatures.witnessed_checkpoint(session, witnessing)
    if found is None:
        raise NotFound(
            f"no checkpoint has been cosigned by {witnessing.quorum} of the ledger's "
            f"{len(witnessing.witnesses)} witnesses yet"
        )
    return PlainTextResponse(found[1], headers={"Cache-Control": "no-cache"})


class WitnessStatus(BaseModel):
    name: str = PydanticField(description="the witness's name (its cosignature lines' name)")
    vkey: str = PydanticField(description="its cosignature vkey (type 0x04)")
    url: str = PydanticField(description="where the ledger calls it (without credentials)")
    size: int | None = PydanticField(
        None, description="its size for this ledger as last known (from its 200 or 409)"
    )
    cosigned_size: int | None = PydanticField(
        None, description="the largest checkpoint size it cosigned (of those still kept)"
    )
    attempted_at: str | None = PydanticField(None, description="the last call (ledger time)")
    succeeded_at: str | None = PydanticField(None, description="the last cosignature stored")
    status: str | None = PydanticField(
        None,
        description="the last call's outcome: cosigned, timeout, unreachable, "
        "bad_cosignature, conflict, ahead, http_<status>; null before the first call",
    )
    error: str | None = PydanticField(None, description="what went wrong, for people")


class WitnessesStatus(BaseModel):
    size: int = PydanticField(description="the journal's size (its latest checkpoint)")
    quorum: int = PydanticField(description="cosignatures that make a checkpoint witnessed")
    interval_seconds: float = PydanticField(description="at most one round per this long")
    witnessed_size: int | None = PydanticField(
        None, description="the size of GET /journal/checkpoint/cosigned; null if none"
    )
    latest_round_at: str | None = PydanticField(None, description="when the last round started")
    witnesses: list[WitnessStatus]


@router.get(
    "/journal/witnesses",
    summary="How far the ledger's witnesses got",
    response_model=WitnessesStatus,
    responses=error_responses(),
)
def get_witnesses(request: Request, session: ReadSession) -> dict[str, Any]:
    witnessing = _witnessing(request)
    size, _ = store.latest_checkpoint(session)
    if witnessing is None:
        return {"size": size, "quorum": 0, "interval_seconds": 0, "witnesses": []}
    rows = cosignatures.witness_rows(session, witnessing.vkeys)
    items = []
    for info in witnessing.witnesses:
        row = rows.get(info.vkey, {})
        items.append(
            {
                "name": info.name,
                "vkey": info.vkey,
                "url": info.url,
                "size": row.get("size"),
                "cosigned_size": row.get("cosigned_size"),
                "attempted_at": _when(row.get("attempted_at")),
                "succeeded_at": _when(row.get("succeeded_at")),
                "status": row.get("status") or None,
                "error": row.get("error"),
            }
        )
    return {
        "size": size,
        "quorum": witnessing.quorum,
        "interval_seconds": witnessing.interval_seconds,
        "witnessed_size": cosignatures.witnessed_size(session, witnessing.vkeys, witnessing.quorum),
        "latest_round_at": _when(cosignatures.latest_round(session)),
        "witnesses": items,
    }


def _witnessing(request: Request) -> cosignatures.Witnessing | None:
    """The ledger's witnesses (``app.state.witnessing``), None when it has none."""
    witnessing = getattr(request.app.state, "witnessing", None)
    if isinstance(witnessing, cosignatures.Witnessing) and witnessing.witnesses:
        return witnessing
    return None


def _when(value: object) -> str | None:
    return format_timestamp(value) if isinstance(value, datetime) else None


@router.get(
    "/journal/tile/{path:path}",
    summary="C2SP tlog-tiles: hash tiles and entry bundles",
    response_class=Response,
    openapi_extra=OPTIONAL_BEARER,
    responses={
        200: {
            "description": "a hash tile, or an entry bundle (operator and auditors)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        **error_responses(
            401,
            403,
            404,
            notes={
                401: "an invalid bearer on an entry bundle",
                403: "an entry bundle for someone else than the operator and auditors",
                404: "not a tile path, or beyond the journal's size",
            },
        ),
    },
)
def get_tile(
    path: str,
    request: Request,
    session: ReadSession,
    auth_session: PrimaryReadSession,
    _bearer: Bearer,
) -> Response:
    authorization = request.headers.get("authorization")
    size, _ = store.latest_checkpoint(session)
    if path.startswith("entries/"):
        try:
            bundle = parse_entries_path(path)
        except ValueError as exc:
            raise NotFound(f"no such tile: {exc}") from None
        if not tile_exists(0, bundle.n, bundle.width, size):
            raise NotFound(f"entry bundle {path} is beyond the journal's size {size}")
        reader = _principal(request, auth_session, authorization)
        if not _sees_all_entries(request, reader):
            raise Forbidden("entry bundles are for the operator and auditors")
        start = bundle.n * TILE_WIDTH
        rows = store.entries(session, start, start + (bundle.width or TILE_WIDTH))
        body = entry_bundle([entry for _, entry, _ in rows])
        return Response(body, media_type="application/octet-stream", headers=_cache(bundle.width))
    try:
        tile = parse_tile_path(path)
    except ValueError as exc:
        raise NotFound(f"no such tile: {exc}") from None
    if not tile_exists(tile.level, tile.n, tile.width, size):
        raise NotFound(f"tile {path} is beyond the journal's size {size}")
    body = tile_bytes(tile.level, tile.n, tile.width, store.HashTable(session))
    return Response(body, media_type="application/octet-stream", headers=_cache(tile.width))


@router.get(
    "/journal/entries",
    summary="Journal entries start ≤ seq < end, exact bytes",
    response_model=JournalEntries,
    response_model_exclude_unset=True,
    openapi_extra=OPTIONAL_BEARER,
    responses=error_responses(
        401,
        422,
        notes={400: "not start < end, or more than 1,000 entries", 401: "an invalid bearer"},
    ),
)
def get_entries(
    request: Request,
    session: ReadSession,
    auth_session: PrimaryReadSession,
    start: Annotated[int, Query(ge=0, le=MAX_DB_INT)],
    end: Annotated[int, Query(ge=1, le=MAX_DB_INT)],
    _bearer: Bearer,
) -> dict[str, Any]:
    authorization = request.headers.get("authorization")
    if end <= start or end - start > MAX_ENTRIES_PAGE:
        raise BadRequest(f"need start < end and at most {MAX_ENTRIES_PAGE} entries per page")
    reader = _principal(request, auth_session, authorization)
    sees_all = _sees_all_entries(request, reader)
    items = []
    for seq, entry, accounts in store.entries(session, start, end):
        item: dict[str, Any] = {
            "seq": seq,
            "leaf_hash": base64.b64encode(leaf_hash(entry)).decode(),
        }
        if sees_all or (
            reader is not None
            and reader.account is not None
            and reader.may_read(reader.account)
            and reader.account in accounts.split()
        ):
            item["entry"] = base64.b64encode(entry).decode()
        items.append(item)
    size, _ = store.latest_checkpoint(session)
    return {"size": size, "entries": items}


@router.get(
    "/journal/proof/inclusion",
    summary="RFC 9162 inclusion proof of entry seq",
    response_model=InclusionProof,
    response_model_exclude_unset=True,
    responses=error_responses(422, notes={400: "not seq < size ≤ the journal's size"}),
)
def get_inclusion_proof(
    session: ReadSession,
    seq: Annotated[int, Query(ge=0, le=MAX_DB_INT)],
    size: Annotated[int | None, Query(ge=1, le=MAX_DB_INT)] = None,
) -> dict[str, Any]:
    current, _ = store.latest_checkpoint(session)
    tree_size = current if size is None else size
    if tree_size > current or seq >= tree_size:
        raise BadRequest(f"need seq < size ≤ {current}", detail={"seq": seq, "size": tree_size})
    entry = store.entry_bytes(session, seq)
    assert entry is not None
    proof = inclusion_proof(seq, tree_size, store.HashTable(session))
    return {
        "seq": seq,
        "size": tree_size,
        "leaf_hash": base64.b64encode(leaf_hash(entry)).decode(),
        "root": base64.b64encode(store.root(session, tree_size)).decode(),
        "proof": [base64.b64encode(h).decode() for h in proof],
    }


@router.get(
    "/journal/proof/consistency",
    summary="RFC 9162 consistency proof old → new",
    response_model=ConsistencyProof,
    response_model_exclude_unset=True,
    responses=error_responses(422, notes={400: "not 1 ≤ old ≤ new ≤ the journal's size"}),
)
def get_consistency_proof(
    session: ReadSession,
    old: Annotated[int, Query(ge=1, le=MAX_DB_INT)],
    new: Annotated[int, Query(ge=1, le=MAX_DB_INT)],
) -> dict[str, Any]:
    current, _ = store.latest_checkpoint(session)
    if not old <= new <= current:
        raise BadRequest(f"need 1 ≤ old ≤ new ≤ {current}", detail={"old": old, "new": new})
    proof = consistency_proof(old, new, store.HashTable(session))
    return {
        "old": old,
        "new": new,
        "old_root": base64.b64encode(store.root(session, old)).decode(),
        "new_root": base64.b64encode(store.root(session, new)).decode(),
        "proof": [base64.b64encode(h).decode() for h in proof],
    }


def _principal(request: Request, session: Any, authorization: str | None) -> Principal | None:
    if authorization is None:
        return None
    return authenticate_bearer(
        session,
        authorization,
        tokens=request.app.state.tokens,
        now=request.app.state.clock.now(),
        api_keys=request.app.state.api_key_principal,
    )


def _sees_all_entries(request: Request, reader: Principal | None) -> bool:
    if request.app.state.settings.journal_access == "public":
        return True
    return reader is not None and reader.sees_everything


def _cache(width: int | None) -> dict[str, str]:
    return {"Cache-Control": IMMUTABLE if width is None else "no-cache"}


# GET /journal/stream (Server-Sent Events) is served with the journal's routes.
router.include_router(stream_router)
