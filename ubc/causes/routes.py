"""HTTP reads of the causes (stub)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["causes"])
