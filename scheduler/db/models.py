"""ORM rows for organisations, people, credentials and the machines: who and what."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from protocol.states import GpuHealth
from scheduler.db.base import Base
from scheduler.db.types import utcnow
from scheduler.states import NodeState, Role, TokenKind


def _enum(cls: type[Any], length: int = 32) -> Enum:
    """Enums stored as checked strings: portable, and new values need no type migration."""
    return Enum(
        cls,
        native_enum=False,
        length=length,
        validate_strings=True,
        create_constraint=True,
        values_callable=lambda e: [m.value for m in e],
    )


class Org(Base):
    """A node of the organisation tree (a company, a programme, or a group inside one)."""

    __tablename__ = "orgs"
    __table_args__ = (CheckConstraint("shares > 0", name="shares_positive"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("orgs.id", ondelete="RESTRICT"), index=True
    )
    shares: Mapped[float] = mapped_column(Float, default=1.0)
    default_time_limit_s: Mapped[int | None] = mapped_column(Integer)
    # Its jobs, and those of every org below it, run only on nodes with strict isolation.
    require_isolation: Mapped[bool] = mapped_column(Boolean, default=False)
    # Its one-node jobs, and those of every org below it, run in a network of their own
    # (`private`); `require_private_network` is its own setting, `private_network_required`
    # that or its parent's (kept when either changes: the submission guard reads one row).
    require_private_network: Mapped[bool] = mapped_column(Boolean, default=False)
    private_network_required: Mapped[bool] = mapped_column(Boolean, default=False)
    # fnmatch patterns a job's image must match; empty: any image.
    image_patterns: Mapped[list[str]] = mapped_column(default=list)
    # The highest priority class its members may submit at; None: the server's default.
    max_priority_class: Mapped[str | None] = mapped_column(String(32))
    # Its pending jobs at most; None: the server's max_pending_jobs_per_org.
    max_pending_jobs: Mapped[int | None] = mapped_column(Integer)
    # Longest time limit of its interactive jobs; None: its parent's, up to the server's default.
    interactive_max_time_s: Mapped[int | None] = mapped_column(Integer)
    # Idle time that ends its interactive jobs (0: never); None: its parent's, or the server's.
    interactive_idle_timeout_s: Mapped[int | None] = mapped_column(Integer)
    # A tenant of its own (a company): the orgs above it see it only in aggregates. False: a
    # group of its parent's tenant, which the orgs above it, up to that tenant, see in full.
    tenant: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Quota(Base):
    """Per GPU type: `guaranteed` GPUs (nominal quota) and `limit` (borrowing included)."""

    __tablename__ = "quotas"
    __table_args__ = (
        UniqueConstraint("org_id", "gpu_type"),
        CheckConstraint("guaranteed >= 0", name="guaranteed_nonneg"),
        CheckConstraint('"limit" IS NULL OR "limit" >= guaranteed', name="limit_ge_guaranteed"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    gpu_type: Mapped[str] = mapped_column(String(64))
    guaranteed: Mapped[int] = mapped_column(Integer, default=0)
    limit: Mapped[int | None] = mapped_column(Integer)  # None: no limit beyond the cluster
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OrgUsage(Base):
    """An org's decayed, billing-weighted GPU-seconds, kept incrementally for the core."""

    __tablename__ = "org_usage"

    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    decayed_gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    as_of: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    """A person. A name is unique within its org, and among platform admins (no org): a name
    taken in one company tells nothing to another, nor keeps it from using the name."""

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("org_id", "name"),
        # NULLs are distinct in a unique constraint: platform admins need their own index.
        Index(
            "uq_users_platform_admin_name",
            "name",
            unique=True,
            postgresql_where=text("org_id IS NULL"),
            sqlite_where=text("org_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    org_id: Mapped[int | None] = mapped_column(
        ForeignKey("orgs.id", ondelete="RESTRICT"), index=True
    )
    role: Mapped[Role] = mapped_column(_enum(Role), default=Role.MEMBER)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(index=True)


class ApiToken(Base):
    """A bearer credential. Only its SHA-256 is stored; the secret is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[TokenKind] = mapped_column(_enum(TokenKind))
    name: Mapped[str] = mapped_column(String(128), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    node_id: Mapped[int | None] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), index=True
    )
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    uses_left: Mapped[int | None] = mapped_column(Integer)  # join tokens: None = unlimited
    created_by_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Audit retention finds dead tokens by these (scheduler/services/auditretention.py).
    expires_at: Mapped[datetime | None] = mapped_column(index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(index=True)
    last_used_at: Mapped[datetime | None] = mapped_column()


class Site(Base):
    """A data centre."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    domain: Mapped[str] = mapped_column(String(128), default="")  # NVLink / rack domain
    state: Mapped[NodeState] = mapped_column(_enum(NodeState), default=NodeState.READY, index=True)
    state_reason: Mapped[str | None] = mapped_column(String(1024))
    labels: Mapped[dict[str, str]] = mapped_column(default=dict)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    address: Mapped[str] = mapped_column(String(255), default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    # How its agent confines tasks (protocol.agent.Isolation): "strict" or "none".
    isolation: Mapped[str] = mapped_column(String(16), default="none")
    # What its agent can do (protocol.agent.AGENT_CAPABILITIES); NULL: an agent older than that.
    capabilities: Mapped[list[str] | None] = mapped_column()
    # Each GPU's share of the memory its tasks may hold (protocol.agent.AgentRegister); a job's
    # `--mem` is placed only where its GPUs' share holds it. NULL: unknown, placed as before.
    memory_per_gpu_bytes: Mapped[int | None] = mapped_column(BigInteger)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column()
    # Until then, one registration with a join token alone may take this node over (an
    # operator's `fairgpu node approve`); otherwise re-registering needs the node's credential.
    takeover_approved_until: Mapped[datetime | None] = mapped_column()


class Gpu(Base):
    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("node_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(96), unique=True)
    model: Mapped[str] = mapped_column(String(64))  # the GPU type used by quotas and jobs
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    health: Mapped[GpuHealth] = mapped_column(_enum(GpuHealth), default=GpuHealth.HEALTHY)
    health_reason: Mapped[str | None] = mapped_column(String(1024))
    last_sample: Mapped[dict[str, Any] | None] = mapped_column()
    last_sample_at: Mapped[datetime | None] = mapped_column()


class SchedulerLease(Base):
    """Who runs the scheduling cycle. `epoch` fences out a leader that lost the lease."""

    __tablename__ = "scheduler_lease"

    id: Mapped[int] = mapped_column(primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    renewed_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(default=utcnow)


class RetentionCursor(Base):
    """How far a retention pass has got, kept across restarts and leader changes: without it a
    new leader would walk again, a few hundred rows a minute, through everything purged
    already before it reached what expired since (secrets kept past their retention)."""

    __tablename__ = "retention_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    through_at: Mapped[datetime] = mapped_column()
    through_id: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
