"""Payload schemas of causes."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from ubc.rules.payload import Handle, Payload, Slug, Text


class CauseRegister(Payload):
    slug: Slug
    name: Annotated[str, StringConstraints(min_length=1, max_length=80)]
    description: Text
    stewards: Annotated[list[Handle], Field(min_length=1, max_length=16)]

    human_text = ("name", "description")
    multiline_text = frozenset({"description"})


class CauseUpdate(CauseRegister):
    pass
