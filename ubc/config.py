"""Settings, each an environment variable with the prefix ``UBC_`` (DESIGN section 2)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ubc.dburl import normalise_database_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UBC_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///ubc.db",
        description="SQLAlchemy URL; sqlite:///ubc.db (default) or postgresql+psycopg://...",
    )
    read_database_url: str | None = Field(
        default=None,
        description='a PostgreSQL streaming replica of DATABASE_URL for reads (README "A '
        'read replica"); unset: the primary serves every read',
    )
    data_dir: Path = Field(default=Path("ubc-data"), description="keys and tokens")
    origin: str = Field(
        default="localhost/ubc",
        description="the ledger origin: checkpoint key name and every payload's `ledger`",
    )
    enrollment: Literal["invite", "open"] = "invite"
    journal_access: Literal["restricted", "public"] = "restricted"
    journal_stream_max: int = Field(
        default=100,
        ge=0,
        description="concurrent GET /journal/stream connections per worker; more answer 503",
    )
    models_file: Path | None = None
    operator_public_keys: list[str] = Field(
        default_factory=list,
        description="operator public keys (base64); default: the key in DATA_DIR/operator.key",
    )
    created_at_skew_seconds: int = Field(default=300, ge=1)
    hold_sweep_interval_seconds: float = Field(default=1.0, gt=0)
    withdrawal_approval_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=1,
        description="how long a member-signed withdrawal may wait for the operator",
    )
    market_fee_bps: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="the market's fee in basis points of each fill's payment, paid by the "
        "seller; unset keeps the journal's (0 in a new ledger)",
    )
    # Limits of one request and one connection (issue 12): what a reverse proxy would set.
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="the largest request body any route reads; more answers 413 while reading",
    )
    max_json_depth: int = Field(
        default=64, ge=4, description="the deepest nesting of arrays and objects accepted"
    )
    timeout_keep_alive_seconds: float = Field(
        default=5.0, gt=0, description="an idle keep-alive connection is closed after this long"
    )
    timeout_request_seconds: float = Field(
        default=30.0,
        gt=0,
        description="a request's headers and body must arrive within this long",
    )
    max_connections: int = Field(
        default=1000, ge=1, description="concurrent connections per worker; more answer 503"
    )
    embedding_max_inputs: int = Field(default=2048, ge=1, description="inputs per embeddings call")
    embedding_max_input_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1, description="total bytes of text per embeddings call"
    )
    gateway_cpu_slots_per_key: int = Field(
        default=1,
        ge=1,
        description="tokenizing or local inference running at once for one API key",
    )
    gateway_hold_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="a model call's hold expires (unbilled) this long after it was placed",
    )
    gateway_spare_holds: bool = Field(
        default=False,
        description="spare holds for lone callers: once calls of one key and model come "
        "one after another, place the next call's hold while the current one runs (a lone "
        "call then waits for no transaction; an unused spare is released by a 0-token usage "
        "entry and keeps one more call's worth held for up to a second): docs/http.md",
    )
    # Prometheus metrics at GET /metrics (issue 17; README "Metrics and alerts").
    metrics_access: Literal["auto", "open", "token", "off"] = Field(
        default="auto",
        description="who may read GET /metrics: auto (open when the server listens on "
        "loopback only, else as token), open, token (Authorization: Bearer "
        "$UBC_METRICS_TOKEN), off (404)",
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="the bearer token of GET /metrics (access token or auto)"
    )
    metrics_balance_interval_seconds: float = Field(
        default=30.0,
        ge=0,
        description="the per-asset balance sums of GET /metrics read every account: computed "
        "at most this often per process, cached in between",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="the server's log lines: text (one readable line) or json (one object "
        "per line); `ubc serve --log-format` overrides it",
    )
    # The ledger's witnesses (issue 18; docs/witness.md section 8).
    witnesses: str = Field(
        default="",
        description="witnesses that cosign the ledger's checkpoints, `<vkey>@<url>` "
        "separated by commas (the vkey of type 0x04 that `ubc witness init` prints); "
        "empty: none",
    )
    witness_quorum: int | None = Field(
        default=None,
        ge=1,
        description="how many of UBC_WITNESSES make a checkpoint witnessed "
        "(GET /journal/checkpoint/cosigned); default: all of them",
    )
    witness_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description="at most one round of add-checkpoint calls per this many seconds (all "
        "processes together), and only when the checkpoint changed",
    )
    witness_timeout_seconds: float = Field(
        default=10.0, gt=0, description="how long one add-checkpoint call may take"
    )
    # Webhooks (issue 18; docs/events.md).
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="how long one webhook delivery may take"
    )
    webhook_retry_seconds: float = Field(
        default=24 * 3600.0,
        ge=60,
        description="a webhook endpoint failing the same entry this long (retried with "
        "backoff, 1 s doubling to 1 h) is marked failing until replayed",
    )
    webhook_log_retention_seconds: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="how long the delivery log keeps each attempt",
    )
    redis_url: str | None = Field(
        default=None,
        description="redis://host:port/db shared by every worker and host for the API keys' "
        "rpm/tpm limits; unset: each process keeps its own (with N processes, N times the "
        "limit); Redis unreachable: per process until it is back",
    )

    @field_validator("database_url")
    @classmethod
    def _psycopg_for_postgres(cls, url: str) -> str:
        return normalise_database_url(url)  # postgres:// as providers hand it out

    @field_validator("read_database_url")
    @classmethod
    def _psycopg_for_replica(cls, url: str | None) -> str | None:
        return normalise_database_url(url) if url else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def configured_database_url() -> str:
    """``$UBC_DATABASE_URL`` (normalised), else the default ``sqlite:///ubc.db``.

    Read afresh (not through the cached :func:`get_settings`). It lives here, beside the
    settings, rather than in ``ubc.dburl``, which the settings use: one direction only.
    """
    return Settings().database_url  # normalised by the field's validator
