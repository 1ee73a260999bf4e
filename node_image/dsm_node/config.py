"""A node's own configuration: flags or ``DSM_``-prefixed environment variables.

Cluster-wide behaviour (heartbeat interval, offline threshold, retention) lives in the database's
settings instead, so that every node agrees; the values here only seed them on first bootstrap.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dsm_node import __version__
from dsm_node.db.engine import sqlalchemy_url
from dsm_node.settings_store import MIN_THRESHOLD_INTERVALS, ClusterSettings

DEFAULT_HEARTBEAT_INTERVAL = ClusterSettings.model_fields["heartbeat_interval_seconds"].default
EXPECTED_DATABASE_URL = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


def database_url_problem(url: str) -> str | None:
    """Why a database URL cannot be used (malformed, or not PostgreSQL), or None."""
    if not url.strip():
        return f"it is empty; expected {EXPECTED_DATABASE_URL}"
    try:
        parsed = make_url(url)
        _ = parsed.port  # a port that is not a number fails only here
    except (ArgumentError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"it is malformed ({reason}); expected {EXPECTED_DATABASE_URL}"
    try:
        sqlalchemy_url(url)
    except ValueError:
        return (
            f"its scheme {parsed.drivername!r} is not supported: dsm needs PostgreSQL, "
            f"{EXPECTED_DATABASE_URL}"
        )
    return None


class NodeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSM_", extra="ignore")

    database_url: str = Field(description="postgresql:// URL of the shared database.")
    node_name: str = Field(default_factory=socket.gethostname, description="Unique node name.")
    advertise_address: str | None = Field(None, description="Address peers and agents use.")
    bind_address: str = Field("0.0.0.0", description="Address to listen on.")
    api_port: int = Field(4119, ge=1, le=65535, description="HTTPS port for console and API.")
    heartbeat_port: int = Field(
        4120,
        ge=0,
        le=65535,
        description="Port of the agent protocol (mutual TLS; 0: this node serves no agents).",
    )
    agent_batch_max: int = Field(
        500, ge=1, le=10_000, description="Most heartbeats written in one group commit."
    )
    agent_batch_wait_seconds: float = Field(
        0.005, ge=0, le=1, description="Longest a heartbeat waits for others to share a commit."
    )
    agent_committers: int = Field(
        2, ge=1, le=64, description="Group commits in flight at once (database connections)."
    )
    software_version: str = Field(__version__, description="Version this node runs.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate; generated if absent.")
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file.")
    offline_threshold_seconds: float | None = Field(
        None,
        ge=1.5,
        le=86400,
        description="Seeds the cluster's offline threshold on first bootstrap "
        "(at least 3 heartbeat intervals).",
    )
    heartbeat_interval_seconds: float | None = Field(
        None,
        ge=0.5,
        le=600,
        description="Seeds the cluster's heartbeat interval on first bootstrap.",
    )
    concurrency: int = Field(64, ge=1, le=10_000, description="Jobs this node runs at once.")
    claim_batch: int = Field(32, ge=1, le=1000, description="Most jobs claimed per statement.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long running jobs may finish before release."
    )
    local_secret: SecretStr | None = Field(
        None, description="Secret that unwraps the master key; the same on every node."
    )
    local_secret_file: Path | None = Field(None, description="File holding the local secret.")
    admin_username: str = Field("admin", description="First administrator, created once.")
    admin_password: SecretStr | None = Field(None, description="First administrator's password.")
    admin_password_file: Path | None = Field(None, description="File holding admin_password.")
    bootstrap_api_key: SecretStr | None = Field(
        None, description="Administrator API key registered on first start (the operator's)."
    )
    bootstrap_api_key_file: Path | None = Field(None, description="File holding the API key.")
    reuse_decommissioned_name: bool = Field(
        False,
        description="Join as a new node when this name was decommissioned (on Kubernetes a new "
        "pod for a scaled-down ordinal is a new node); by default such a node refuses to start.",
    )
    clock_offset_seconds: float = Field(
        0.0, description="Test-only: shifts this node's wall clock (its liveness never uses it)."
    )
    extra_migrations_dir: Path | None = Field(None, description="Test-only extra migrations.")
    job_modules: str = Field(
        "", description="Comma-separated Python modules to import: they register more job types."
    )
    db_pool_size: int = Field(10, ge=2, le=200, description="Database connections of this node.")
    api_db_pool_size: int = Field(
        5, ge=1, le=200, description="Database connections of the API (its own, apart from jobs)."
    )
    sign_in_workers: int = Field(
        2, ge=1, le=64, description="Threads hashing passwords (Argon2id: 64 MiB each)."
    )
    sign_in_queue: int = Field(
        8, ge=0, le=10_000, description="Sign-ins waiting for a hashing thread; beyond: 503."
    )
    http_header_timeout_seconds: float = Field(
        10.0, gt=0, le=3600, description="A request's head must arrive within this."
    )
    http_body_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="A request's body must arrive within this."
    )
    http_keepalive_timeout_seconds: float = Field(
        75.0, gt=0, le=3600, description="Idle keep-alive connections are closed after this."
    )
    tls_handshake_timeout_seconds: float = Field(
        10.0, gt=0, le=3600, description="A TLS handshake must complete within this."
    )

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, v: str) -> str:
        if (problem := database_url_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _seeded_settings_agree(self) -> NodeConfig:
        interval = self.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_INTERVAL
        threshold = self.offline_threshold_seconds
        if threshold is not None and threshold < MIN_THRESHOLD_INTERVALS * interval:
            raise ValueError(
                f"offline_threshold_seconds ({threshold:g}) must be at least "
                f"{MIN_THRESHOLD_INTERVALS} times heartbeat_interval_seconds ({interval:g})"
            )
        return self

    def secret(self, name: str) -> str | None:
        """A secret from its value or its file (Kubernetes mounts Secrets as files)."""
        value: SecretStr | None = getattr(self, name)
        path: Path | None = getattr(self, f"{name}_file")
        if value is not None:
            return value.get_secret_value()
        if path is not None:
            return path.read_text().strip()
        return None

    @property
    def address(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        return "127.0.0.1" if self.bind_address in ("0.0.0.0", "::") else self.bind_address
