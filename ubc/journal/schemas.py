"""What the journal's JSON routes answer (``ubc/journal/routes.py``); the checkpoint and
the tiles are text and bytes. Pure pydantic, for ``response_model=``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ubc.schemas import Schema, absent

__all__ = ["ConsistencyProof", "InclusionProof", "JournalEntries", "JournalEntry"]


class JournalEntry(Schema):
    seq: int
    leaf_hash: str = Field(description="standard base64 of the RFC 9162 leaf hash")
    # Absent (never null) for a reader who may not see this entry's contents.
    entry: Annotated[
        str, absent("standard base64 of the entry's exact bytes, for those who may read it")
    ]


class JournalEntries(Schema):
    """``GET /journal/entries``: ``start ≤ seq < end``."""

    size: int = Field(description="the journal's size now")
    entries: list[JournalEntry]


class InclusionProof(Schema):
    """``GET /journal/proof/inclusion``; hashes in standard base64."""

    seq: int
    size: int
    leaf_hash: str
    root: str
    proof: list[str]


class ConsistencyProof(Schema):
    """``GET /journal/proof/consistency``; hashes in standard base64."""

    old: int
    new: int
    old_root: str
    new_root: str
    proof: list[str]
