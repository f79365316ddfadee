"""The models file: which models the endpoint serves, where, and at what price.

A TOML file (``UBC_MODELS_FILE``), read with the standard library::

    # Serve the built-in local embedding model too (default true).
    local_embeddings = true

    [models."llama-3.1-8b"]
    backend = "upstream"                    # any OpenAI-compatible server
    kind = "chat"                           # chat | embeddings
    url = "http://127.0.0.1:8001/v1"        # its base URL
    upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
    api_key_env = "VLLM_API_KEY"            # environment variable with its key (optional)
    input_price = 2                         # integer CU per 1K input tokens
    output_price = 6                        # integer CU per 1K output tokens
    rpm = 60                                # default requests per minute per API key
    tpm = 100000                            # default tokens per minute per API key
    max_output_tokens = 4096                # max_tokens when the caller gives none

    [models."all-minilm-l6-v2"]             # the local model, re-priced
    backend = "local"
    kind = "embeddings"
    input_price = 1

Prices are published in the journal (``ledger.genesis``, then ``ledger.config`` when
they change), so an auditor checks every call at the prices of its time.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ubc.rules.payload import MAX_AMOUNT

LOCAL_MODEL_ID = "all-minilm-l6-v2"

Price = Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")]


class ModelsFileError(ValueError):
    """The models file cannot be used; the message says where and why."""


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    backend: Literal["local", "upstream"]
    kind: Literal["chat", "embeddings"]
    url: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None
    input_price: Price
    output_price: Price = 0
    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 300

    @model_validator(mode="after")
    def _backend_fields(self) -> _ModelEntry:
        if self.backend == "upstream":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError("an upstream model needs url = 'http(s)://host/v1'")
        elif self.kind != "embeddings":
            raise ValueError("the local backend serves embeddings only")
        return self


class _ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    local_embeddings: bool = True
    models: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")], _ModelEntry
    ] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One served model."""

    id: str
    backend: str
    kind: str
    input_price: int
    output_price: int
    url: str | None = None
    upstream_model: str | None = None
    api_key: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_output_tokens: int = 4096
    timeout_seconds: int = 300

    @property
    def price(self) -> dict[str, int]:
        """As published in the journal: CU per 1K input and output tokens."""
        return {"input": self.input_price, "output": self.output_price}


LOCAL_MODEL = ModelSpec(
    id=LOCAL_MODEL_ID, backend="local", kind="embeddings", input_price=1, output_price=0
)


def load_catalog(path: Path | None) -> dict[str, ModelSpec]:
    """The models of ``path`` (None: only the local embedding model)."""
    if path is None:
        return {LOCAL_MODEL_ID: LOCAL_MODEL}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsFileError(f"cannot read the models file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelsFileError(f"{path} is not valid TOML: {exc}") from None
    try:
        parsed = _ModelsFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ModelsFileError(f"{path}: {problems}") from None
    catalog: dict[str, ModelSpec] = {}
    if parsed.local_embeddings and LOCAL_MODEL_ID not in parsed.models:
        catalog[LOCAL_MODEL_ID] = LOCAL_MODEL
    for model_id, entry in parsed.models.items():
        api_key = None
        if entry.api_key_env:
            api_key = os.environ.get(entry.api_key_env)
            if api_key is None:
                raise ModelsFileError(
                    f"{path}: model {model_id!r} reads its upstream key from "
                    f"${entry.api_key_env}, which is not set"
                )
        catalog[model_id] = ModelSpec(
            id=model_id,
            backend=entry.backend,
            kind=entry.kind,
            input_price=entry.input_price,
            output_price=entry.output_price,
            url=entry.url.rstrip("/") if entry.url else None,
            upstream_model=entry.upstream_model or model_id,
            api_key=api_key,
            rpm=entry.rpm,
            tpm=entry.tpm,
            max_output_tokens=entry.max_output_tokens,
            timeout_seconds=entry.timeout_seconds,
        )
    return catalog


def prices(catalog: dict[str, ModelSpec]) -> dict[str, dict[str, int]]:
    """The prices to publish, by model id."""
    return {model_id: spec.price for model_id, spec in sorted(catalog.items())}
