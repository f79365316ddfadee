"""The witness over HTTP: ``POST /add-checkpoint`` (C2SP tlog-witness).

The body is read up to :data:`MAX_BODY_BYTES` (a larger one answers 413); the checks and
the database work run in a worker thread. ``GET /`` tells the witness's name and vkey and
the origins it follows (plain text, for operators).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from ubc.witness.protocol import MAX_BODY_BYTES, Witness

__all__ = ["create_witness_app"]


def create_witness_app(witness: Witness) -> FastAPI:
    """The ASGI application of ``witness`` (its store's table must exist)."""
    app = FastAPI(
        title="ubc witness",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.witness = witness

    @app.post("/add-checkpoint")
    async def add_checkpoint(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return PlainTextResponse(f"request body over {MAX_BODY_BYTES} bytes\n", 413)
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BODY_BYTES:
                return PlainTextResponse(f"request body over {MAX_BODY_BYTES} bytes\n", 413)
            chunks.append(chunk)
        answer = await run_in_threadpool(witness.handle, b"".join(chunks))
        # Set as is: Starlette would add "; charset=utf-8" to a text/ media type, and a
        # client may compare text/x.tlog.size exactly.
        return Response(
            answer.body.encode("utf-8"),
            answer.status,
            headers={"Content-Type": answer.content_type},
        )

    @app.get("/")
    def about() -> PlainTextResponse:
        lines = [
            f"ubc witness {witness.cosigner.name}",
            f"vkey {witness.cosigner.vkey}",
            *(f"log {origin}" for origin in sorted(witness.logs)),
        ]
        return PlainTextResponse("".join(line + "\n" for line in lines))

    return app
