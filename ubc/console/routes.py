"""The console's routes: its pages (Jinja2 templates, autoescaped) and static files."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ubc.deps import ReadSession
from ubc.journal import store

HERE = Path(__file__).parent
STATIC_URL = "/console/static"
# Only this origin's scripts, styles and calls; no inline script, no eval, no framing.
CONSOLE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)

templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)
static = StaticFiles(directory=HERE / "static")


def page(request: Request, template: str, **context: Any) -> Response:
    """A page of the console, with its CSP and no caching of what it shows."""
    response = templates.TemplateResponse(
        request, template, {"ledger": request.app.state.ledger_info, **context}
    )
    response.headers["content-security-policy"] = CONSOLE_CSP
    response.headers["cache-control"] = "no-cache"
    return response


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: ReadSession) -> Response:
    """The ledger's origin, vkey and latest signed checkpoint."""
    size, checkpoint = store.latest_checkpoint(session)
    now: datetime = request.app.state.clock.now()
    return page(request, "home.html", size=size, checkpoint=checkpoint, now=now)
