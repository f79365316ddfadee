"""HTTP reads of the market (stub)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["market"])
