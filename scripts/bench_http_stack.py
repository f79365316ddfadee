"""CPU per ``POST /api/envelopes`` in the application's HTTP stack, without a database.

Builds the real application (``ubc.app.create_app``: every middleware, the routes, the
exception handlers) on a scratch SQLite URL that is never opened, replaces the group-commit
writer with a stub that accepts every envelope at once, and calls the ASGI application
directly ``--requests`` times with one transfer-sized body: what is measured is the HTTP
layer's Python (request id and access line, body guard, security headers, routing, JSON,
the response), not uvicorn's parser, the signature check or the database. The figure is
CPU time (``time.process_time``), so other work on the machine changes it little; the
best of ``--rounds`` rounds is reported.

    python scripts/bench_http_stack.py --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubc.app import create_app
from ubc.config import Settings
from ubc.rules.writing import Accepted, Receipt

BODY = (
    b'{"payloadType":"application/vnd.ubc.transfer+json","payload":"'
    + b"A" * 400
    + b'","signatures":[{"keyid":"0123456789abcdef","sig":"'
    + b"B" * 88
    + b'"}]}'
)


class StubWriter:
    """Accepts every envelope at once with a transfer's receipt."""

    async def submit(self, raws: Sequence[object], *, atomic: bool = False) -> list[Accepted]:
        effects = [
            {"account": "member:a/CU", "delta": -1},
            {"account": "member:b/CU", "delta": 1},
        ]
        return [Accepted(Receipt(id="0" * 36, type="transfer", effects=effects, seq=5), False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="write a cProfile of the rounds here")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ubc-http-stack-"))
    app = create_app(Settings(database_url=f"sqlite:///{tmp / 'unused.db'}", data_dir=tmp))
    app.state.writer = StubWriter()
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/envelopes",
        "raw_path": b"/api/envelopes",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def one() -> int:
        status = 0
        pending = True

        async def receive() -> dict[str, Any]:
            nonlocal pending
            if pending:
                pending = False
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(dict(scope, state={}), receive, send)
        return status

    async def run() -> list[float]:
        status = await one()
        if status != 201:
            raise SystemExit(f"the stubbed write answered {status}, not 201")
        profile = cProfile.Profile() if args.profile else None
        if profile is not None:
            profile.enable()
        rounds = []
        for _ in range(args.rounds):
            started = time.process_time()
            for _ in range(args.requests):
                await one()
            rounds.append((time.process_time() - started) / args.requests * 1e6)
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
            pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)
        return rounds

    rounds = asyncio.run(run())
    shown = ", ".join(f"{r:.1f}" for r in rounds)
    print(f"CPU per POST /api/envelopes in the HTTP stack: {min(rounds):.1f} µs (rounds: {shown})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
