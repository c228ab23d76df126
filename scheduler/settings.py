"""One typed configuration for every fairgpu process, read from `FAIRGPU_*` variables."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Self

from pydantic import (
    Field,
    SecretStr,
    SerializationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.policysettings import RENAMED_ENV, PolicySettings
from scheduler.secretenv import check_keys

DEFAULT_SQLITE_FILE = "fairgpu.db"


def normalise_database_url(url: str) -> str:
    """Choose the async driver for the user: plain `postgresql://` and `sqlite:///` URLs work.

    PostgreSQL goes through asyncpg, SQLite through aiosqlite. A URL that already names a driver
    is left alone only when it names one of those two.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(
            f"not a database URL: {url!r} (expected postgresql://... or sqlite:///...)"
        )
    base = scheme.split("+", 1)[0].lower()
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    raise ValueError(f"unsupported database {scheme!r}: fairgpu runs on PostgreSQL or SQLite")


class Settings(BaseSettings):
    """Settings for the server, the scheduler, the agent and the CLI.

    Every field reads from `FAIRGPU_<NAME>`; every duration and size carries its unit in its name.
    """

    # A refused value is never echoed: it may be a key or a database password.
    model_config = SettingsConfigDict(
        env_prefix="FAIRGPU_", extra="forbid", hide_input_in_errors=True
    )

    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{Path.cwd() / DEFAULT_SQLITE_FILE}",
        description="PostgreSQL (postgresql://user@host/db) or SQLite (sqlite:///path) URL.",
    )
    database_pool_size: int = Field(10, ge=1, le=200, description="Connections per server process.")
    database_echo: bool = Field(False, description="Log every SQL statement (debugging only).")
    database_pre_ping: bool = Field(
        False,
        description="Test each pooled connection before use. Off: on PostgreSQL a ping is three "
        "round trips per request; a connection lost to a database restart instead fails one "
        "request with 503 + Retry-After and is replaced.",
    )
    migrate_on_start: bool = Field(True, description="Run migrations when the server starts.")
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token /metrics asks for (Prometheus' `authorization` setting); unset, "
        "/metrics answers only clients on the server's own machine (loopback, not through a "
        "proxy): it shows every org's name and counts.",
    )
    secret_keys: SecretStr | None = Field(
        None,
        description="Fernet keys that encrypt jobs' secret_env at rest, comma-separated: the "
        "first encrypts, every one decrypts (add a new key first to rotate; `fairgpu admin "
        "gen-secret-key` prints one). Unset, submissions with secret_env are refused.",
    )
    hot_paths: bool = Field(
        True,
        description="Answer quiet heartbeats and plain submissions on raw asyncpg before "
        "FastAPI routes them (PostgreSQL only; api/direct.py). Off: every request is routed.",
    )
    run_scheduler: bool = Field(
        True,
        description="This process competes for the scheduler lease and runs cycles when it "
        "holds it. Off: it serves the API only and asks the lease holder for cycles through "
        "PostgreSQL (LISTEN/NOTIFY); `fairgpu server --workers N` turns it off in its HTTP "
        "workers and runs the scheduler in a process of its own.",
    )
    auth_cache_ttl_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="How long a server process remembers a token it has checked. A revocation "
        "made through another replica takes effect within this time; 0 checks every request.",
    )

    stream_auth_recheck_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How often a server process checks again the token behind each open "
        "stream (`attach`, `run --pty`, `port-forward`) it holds, and that its user may still "
        "reach the job: a revoked token, a disabled user or lost access closes the stream "
        "within this time (plus `auth_cache_ttl_s` when the change went through another "
        "replica), an expiring token at its expiry. WebSocket close code 1008.",
    )

    server_relay_url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#\s]+$",
        description="How the other server processes reach this one to hand over the node's "
        "side of an interactive stream (docs/INTERACTIVE.md): http(s)://HOST:PORT, an address "
        "of this replica (in Kubernetes its pod IP) that every other replica can reach. Port 0: "
        "this process listens on a port of its own on HOST (each worker of `--workers N`). "
        "Unset: the address a user's stream reached this process at, right for one process.",
    )
    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the server listens on.")

    cycle_interval_s: float = Field(
        5.0, gt=0, description="Longest time between two scheduling cycles."
    )
    cycle_min_gap_s: float = Field(
        0.05, ge=0, description="Shortest time between two cycles: events arriving faster coalesce."
    )
    explain_interval_s: float = Field(
        10.0,
        ge=0,
        description="How often every pending job's reasons and estimate are rewritten "
        "(new jobs are explained at their first cycle).",
    )
    lease_timeout_s: float = Field(
        10.0, gt=0, description="A standby replica takes the scheduler lease after this long."
    )
    heartbeat_interval_s: float = Field(
        10.0, gt=0, description="How often agents report in when nothing else happens."
    )
    heartbeat_long_poll_s: float = Field(
        25.0, ge=0, description="Longest time the server holds an agent's heartbeat for news."
    )
    long_poll_recheck_s: float = Field(
        1.0,
        gt=0,
        description="With several replicas, how often a held heartbeat re-checks the database.",
    )
    node_timeout_s: float = Field(
        60.0, gt=0, description="A node that has not reported for this long is marked down."
    )
    heartbeat_flush_interval_s: float = Field(
        1.0,
        ge=0,
        description="Heartbeats that change nothing are remembered in memory and their liveness "
        "and GPU samples written in one batch this often (a crash loses at most this much of "
        "samples); keep it far below node_timeout_s. 0 writes every heartbeat at once.",
    )
    max_requeues: int = Field(
        3,
        ge=0,
        description="A preemptible job is requeued after NODE_FAIL or preemption at most this "
        "many times; after that it ends in that state, with the reason in its events.",
    )
    requeue_backoff_s: float = Field(
        30.0,
        ge=0,
        description="A requeued job may start again only after this long, doubled for each "
        "requeue before it (30 s, 60 s, 120 s...), so that a job that breaks its nodes does "
        "not go round them at cycle speed.",
    )
    policy: PolicySettings = Field(
        default_factory=PolicySettings,
        description="The scheduling policy, from FAIRGPU_POLICY_* (scheduler/policysettings.py).",
    )
    default_time_limit_s: int = Field(
        86_400, gt=0, description="Time limit of a job whose org sets no default."
    )
    max_time_limit_s: int = Field(
        30 * 86_400, gt=0, description="Longest time limit a job may ask for."
    )
    private_network_required: bool = Field(
        False,
        description="Every one-node job runs in a network namespace of its own (as `--network "
        "private`: only on nodes whose agent can make one); a one-node job asking for "
        "`--network host` is refused (422). Gangs still run in their nodes' network "
        "(docs/ISOLATION.md, The network).",
    )
    interactive_max_time_s: int = Field(
        8 * 3600,
        gt=0,
        description="Longest time limit of an interactive job (a terminal or a notebook holds "
        "GPUs whether or not anybody types) unless its org, or an org above it, sets its own "
        "(`fairgpu org update NAME --interactive-max-time 12h`).",
    )
    interactive_idle_timeout_s: int = Field(
        3600,
        ge=0,
        description="An interactive job with no input from its clients and no use of its GPUs "
        "for this long ends (with a warning to its terminal first); 0: never. An org, or an org "
        "above it, may set its own (`fairgpu org update NAME --interactive-idle-timeout 30m`).",
    )
    token_ttl_s: int = Field(
        90 * 86_400, gt=0, description="Lifetime of a new API token unless one is given."
    )
    join_token_ttl_s: int = Field(
        86_400, gt=0, description="Lifetime of a new join token unless one is given."
    )
    node_credential_ttl_s: int = Field(
        30 * 86_400,
        gt=0,
        description="Lifetime of a node's credential. A heartbeat renews it once less than half "
        "is left (the reply carries the new one); a node away longer than this re-registers "
        "with an operator's approval.",
    )
    task_log_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        description="The most of one task's log the server keeps: beyond it the oldest output "
        "is dropped (the latest is kept) and reading the dropped range gives a marker that says "
        "how many bytes are gone.",
    )

    org_log_max_bytes: int = Field(
        16 * 1024**3,
        ge=0,
        description="The most log text the server keeps for all of one org's tasks (0: no "
        "bound). Past it the logs of the org's tasks that ended first are deleted whole (reading "
        "one says so); while only running tasks' logs are left, the org's new output is dropped "
        "with a one-line marker in the task's log. Other orgs' logs are never touched.",
    )

    default_max_priority_class: str = Field(
        "normal",
        description="The highest priority class an org may submit at unless a platform admin "
        "sets its own (`fairgpu org update NAME --max-priority high`).",
    )
    max_pending_jobs_per_user: int = Field(
        5_000,
        ge=1,
        description="Pending jobs one user may have at once; a submission beyond it is 409.",
    )
    max_pending_jobs_per_org: int = Field(
        20_000,
        ge=1,
        description="Pending jobs one org may have at once unless the org sets its own "
        "(`fairgpu org update NAME --max-pending-jobs N`); a submission beyond it is 409.",
    )
    submit_rate_per_s: float = Field(
        20.0,
        ge=0,
        description="Job submissions per second one token may send on average (a token "
        "bucket per token, per server process); beyond it 429 with Retry-After. 0: no limit.",
    )
    submit_burst: int = Field(
        200, ge=1, description="Submissions one token may send at once before its rate applies."
    )
    heartbeat_rate_per_s: float = Field(
        20.0,
        ge=0,
        description="Heartbeats per second one agent credential may send on average (per "
        "server process). An idle agent sends one per long poll; a busy one also one per task "
        "that starts or ends (a node running many short jobs reaches a few per second), so "
        "the default leaves room. 0: no limit.",
    )
    heartbeat_burst: int = Field(
        200, ge=1, description="Heartbeats one credential may send at once before its rate applies."
    )
    change_rate_per_s: float = Field(
        20.0,
        ge=0,
        description="Other changes per second one token may send on average (POST, PATCH, PUT "
        "and DELETE under /v1/ but submissions and the agent protocol: update, cancel, hold, "
        "release, tokens, users, orgs; a bucket per token, per server process); beyond it 429 "
        "with Retry-After. 0: no limit.",
    )
    change_burst: int = Field(
        200, ge=1, description="Changes one token may send at once before its rate applies."
    )
    read_rate_per_s: float = Field(
        100.0,
        ge=0,
        description="Reads per second (GET under /v1/ but the agent protocol: listings, "
        "describe, explain, logs, usage, shares) one token may send on average, and one user "
        "over all their tokens; a bucket per token and per user, per server process; beyond it "
        "429 with Retry-After. 0: no limit.",
    )
    read_burst: int = Field(
        1000,
        ge=1,
        description="Reads one token, or one user, may send at once before its rate applies.",
    )
    org_read_rate_per_s: float = Field(
        400.0,
        ge=0,
        description="Reads per second all users of one org may send on average, per server "
        "process (the per-user rate times the org's users would be no bound); beyond it 429 "
        "with Retry-After. 0: no limit.",
    )
    org_read_burst: int = Field(
        4000, ge=1, description="Reads one org's users may send at once before its rate applies."
    )
    org_submit_rate_per_s: float = Field(
        80.0,
        ge=0,
        description="Job submissions per second all users of one org may send on average, per "
        "server process (the per-token rate is also each user's over all their tokens; times "
        "an org's users and their tokens it would be no bound); beyond it 429 with "
        "Retry-After. 0: no limit.",
    )
    org_submit_burst: int = Field(
        800,
        ge=1,
        description="Submissions one org's users may send at once before its rate applies.",
    )
    org_change_rate_per_s: float = Field(
        80.0,
        ge=0,
        description="Other changes (see change_rate_per_s) per second all users of one org may "
        "send on average, per server process; beyond it 429 with Retry-After. 0: no limit.",
    )
    org_change_burst: int = Field(
        800, ge=1, description="Changes one org's users may send at once before its rate applies."
    )
    max_tokens_per_user: int = Field(
        100,
        ge=1,
        description="Live API tokens (neither revoked nor expired) one user may hold; one more "
        "is 409. Rate limits are per token, so this also bounds the rate one user can reach.",
    )
    max_users_per_org: int = Field(
        1_000,
        ge=1,
        description="Enabled users one org may have; one more is 409 (disable one first). Rates "
        "and stream caps are per token and per user, so this bounds what one org's admin can "
        "multiply them by.",
    )
    max_user_rows_per_org: int = Field(
        10_000,
        ge=1,
        description="Users one org may keep, disabled ones included; one more is 409. A "
        "disabled user's row stays while its jobs or usage name it, and user names are "
        "global: without this an org admin creating and disabling users would grow the users "
        "table without end and take the names other orgs want. Disabled users that own "
        "nothing are deleted after `audit_retention_s`.",
    )
    max_log_follows_per_user: int = Field(
        8,
        ge=1,
        description="Log reads one user may hold open at once while they wait for output "
        "(`wait_s`, `fairgpu logs -f`), per server process; one more is 429 with Retry-After.",
    )
    max_log_follows_per_org: int = Field(
        64,
        ge=1,
        description="Log reads all users of one org may hold open at once while they wait for "
        "output, per server process: the per-user bound times the org's users would be no "
        "bound; one more is 429 with Retry-After.",
    )
    auth_failure_rate_per_s: float = Field(
        1.0,
        ge=0,
        description="Failed authentications (401 to a request with a bearer token: made-up, "
        "expired or revoked) one client address may cause per second on average, per server "
        "process; while past it, the address's requests with a token this process has not seen "
        "work are 429 with Retry-After before the token is looked up. 0: no limit.",
    )
    auth_failure_burst: int = Field(
        30, ge=1, description="Failed authentications one client address may cause at once."
    )
    trusted_proxies: str = Field(
        "",
        description="Reverse proxies and load balancers (addresses or CIDR networks, separated "
        "by commas) whose X-Forwarded-For names the client; from any other peer the header is "
        "ignored. Empty: the connection's peer is the client.",
    )
    stream_rate_per_s: float = Field(
        5.0,
        ge=0,
        description="WebSocket streams (`attach`, `port-forward`) one token, and one user over "
        "all their tokens, may open per second on average (per server process); beyond it "
        "429 with Retry-After. 0: no limit.",
    )
    stream_burst: int = Field(
        50, ge=1, description="Streams one token or user may open at once before its rate applies."
    )
    org_stream_rate_per_s: float = Field(
        20.0,
        ge=0,
        description="Streams all users of one org together may open per second on average "
        "(per server process), so that one org's flood leaves the others their share. 0: no "
        "limit.",
    )
    org_stream_burst: int = Field(
        200, ge=1, description="Streams one org may open at once before its rate applies."
    )
    agent_stream_rate_per_s: float = Field(
        20.0,
        ge=0,
        description="Sides of streams one node credential may open per second on average "
        "(per server process, before the credential is looked up); beyond it 429. 0: no limit.",
    )
    agent_stream_burst: int = Field(
        200, ge=1, description="Sides of streams a node may open at once before its rate applies."
    )
    max_streams_per_user: int = Field(
        128,
        ge=1,
        description="Streams one user may hold open at once (waiting for the node or "
        "relaying), counted over every server process; one more is 429 with Retry-After.",
    )
    max_streams_per_org: int = Field(
        512,
        ge=1,
        description="Streams the users of one org may hold open at once, over every server "
        "process.",
    )
    max_pending_streams_per_user: int = Field(
        32,
        ge=1,
        description="Streams of one user waiting for their node's agent to open its side "
        "(at most 15 s each), over every server process.",
    )
    max_pending_streams_per_job: int = Field(
        32,
        ge=1,
        description="Streams into one job waiting for their node's agent, over every server "
        "process.",
    )
    max_streams_per_process: int = Field(
        2048,
        ge=1,
        description="Users' sides of streams one server process holds at once, of all orgs "
        "together, and apart as many nodes' sides (each side up to two sockets and a 256 KiB "
        "frame each way); one more is 429 with Retry-After.",
    )
    request_read_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest a connection may take to send a whole request, head and body, "
        "counted from its first byte (from the connection's opening for its first request): "
        "past it the server answers 408 and closes. Without it a client holding many "
        "connections that send nothing, or a byte at a time, kept them open for ever. What "
        "the server does once the request is in (long polls, streams) is not counted.",
    )
    max_job_events_per_kind: int = Field(
        100,
        ge=1,
        description="Events of one kind a tenant can repeat at will (`job.attach`, "
        "`job.forward`, `job.hold`, `job.release`, `job.update`) stored one by one per job; "
        "every later one is counted in a single `<kind>.more` row (how many, the first and the "
        "last), so that a loop of connections or of hold and release cannot fill the database.",
    )
    audit_retention_s: float = Field(
        90 * 86_400.0,
        gt=0,
        description="Events that belong to no job (users, tokens, orgs, nodes) older than "
        "this, and tokens revoked or expired longer ago than this, are deleted by the "
        "scheduler (in batches): a tenant can write both at its change rate for ever.",
    )
    task_log_retention_s: float = Field(
        30 * 86_400.0,
        gt=0,
        description="Log chunks of a task that ended longer ago than this are deleted by the "
        "scheduler (in batches), so that old output does not fill the database.",
    )
    job_detail_retention_s: float = Field(
        90 * 86_400.0,
        gt=0,
        description="The events of a job that ended longer ago than this, and the batch script "
        "and secrets it kept, are deleted by the scheduler (in batches); one `job.purged` event "
        "says how many went. The row, tasks, allocations and usage ledger of a job that ran "
        "stay (`fairgpu history` and usage reports read them); a job that never started is "
        "deleted whole.",
    )
    job_purge_after_s: float = Field(
        2 * 365 * 86_400.0,
        gt=0,
        description="A job that ended longer ago than this is deleted whole (row, tasks, "
        "allocations, usage ledger, events) by the scheduler (in batches), after its ledger "
        "is summed into the usage rollup (per org, user, GPU type and hour): usage reports "
        "keep their totals; `fairgpu history` no longer lists it (Slurm's PurgeJobAfter).",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed(cls, data: Any) -> Any:
        for old, new in RENAMED_ENV.items():
            if old in os.environ:
                raise ValueError(f"{old} is no longer read: set {new} instead")
        return data

    @model_validator(mode="after")
    def _check_priority_class(self) -> Self:
        classes = self.policy.priority_classes
        if self.default_max_priority_class not in classes:
            raise ValueError(
                f"default_max_priority_class {self.default_max_priority_class!r} is not a "
                f"configured priority class; one of {', '.join(classes)}"
            )
        return self

    @field_serializer("metrics_token", "secret_keys", when_used="json")
    def _secret(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        """Masked in JSON unless the dump is for a child process (`to_child_json`)."""
        if value is None:
            return None
        reveal = isinstance(info.context, dict) and info.context.get("reveal_secrets")
        return value.get_secret_value() if reveal else str(value)

    def to_child_json(self) -> str:
        """These settings, secrets included, for a process of ours (`from_child_json`)."""
        return self.model_dump_json(context={"reveal_secrets": True})

    @classmethod
    def from_child_json(cls, text: str) -> Settings:
        """Exactly the parent's settings: no variable of this process is read."""
        return cls.model_validate_json(text)

    @field_validator("secret_keys")
    @classmethod
    def _check_secret_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_keys(value.get_secret_value())
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        normalise_database_url(value)  # raises a clear error for a bad URL
        return value

    @property
    def async_database_url(self) -> str:
        return normalise_database_url(self.database_url)

    @property
    def is_sqlite(self) -> bool:
        return self.async_database_url.startswith("sqlite")
