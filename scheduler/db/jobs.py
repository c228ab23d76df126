"""ORM rows for the work: jobs, their tasks, GPU allocations, events, usage and logs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from protocol.states import JobState
from scheduler.db.base import Base
from scheduler.db.models import _enum
from scheduler.db.types import BigId, utcnow


class Job(Base):
    """A gang of `num_nodes` tasks × `gpus_per_node` GPUs, all or nothing."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        CheckConstraint("gpus_per_node >= 0", name="gpus_per_node_nonneg"),
        CheckConstraint("num_nodes >= 1", name="num_nodes_positive"),
        CheckConstraint("time_limit_s > 0", name="time_limit_positive"),
        Index("ix_jobs_org_id_state", "org_id", "state"),
        # A submission counts the user's pending jobs (the per-user cap).
        Index("ix_jobs_user_id_state", "user_id", "state"),
        # A listing (newest first, one page) of one org or one user walks its own jobs only:
        # without these, an org whose jobs are older than another's reads the other's rows.
        Index("ix_jobs_org_id_id", "org_id", "id"),
        Index("ix_jobs_user_id_id", "user_id", "id"),
        # History and accounting filter finished jobs by when they ended or were submitted.
        Index("ix_jobs_ended_at", "ended_at"),
        Index("ix_jobs_submitted_at", "submitted_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="RESTRICT"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    command: Mapped[list[str]] = mapped_column()
    # A batch script's text (protocol/script.py); `command` is then [script name, *args].
    # Deferred: listings never need it, only `describe --script` and the task's start.
    script: Mapped[str | None] = mapped_column(Text, deferred=True)
    image: Mapped[str | None] = mapped_column(String(512))
    env: Mapped[dict[str, str]] = mapped_column(default=dict)
    # {name: Fernet token of the value} (scheduler/secretenv.py); None: no secret variables.
    # Opened only to build the TaskSpec; the API shows the names with "***".
    secret_env_ciphertext: Mapped[dict[str, str] | None] = mapped_column(JSON(none_as_null=True))
    workdir: Mapped[str | None] = mapped_column(String(1024))
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)  # per node; None: by GPUs
    # Sent to its tasks as FAIRGPU_JOB_SECRET; never returned by the API nor logged.
    job_secret: Mapped[str | None] = mapped_column(String(128))
    gpus_per_node: Mapped[int] = mapped_column(Integer)
    num_nodes: Mapped[int] = mapped_column(Integer, default=1)
    gpu_type: Mapped[str | None] = mapped_column(String(64))
    site: Mapped[str | None] = mapped_column(String(63))
    time_limit_s: Mapped[int] = mapped_column(Integer)
    priority_class: Mapped[str] = mapped_column(String(32), default="normal")
    preemptible: Mapped[bool] = mapped_column(Boolean, default=False)
    # Requeued after PREEMPTED or NODE_FAIL; None: when preemptible (`--requeue/--no-requeue`).
    requeue: Mapped[bool | None] = mapped_column(Boolean)
    # `--signal`, normalised as `[B:]NAME@SECONDS` (protocol/signals.py); None: no warning signal.
    signal: Mapped[str | None] = mapped_column(String(32))
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    # Who may release a hold (scheduler/services/holds.py): "admin" only an org or platform
    # admin; "user" or None (held at submission) its owner too. Who held it and why, for
    # `describe` and `explain`; all three None while not held.
    hold_level: Mapped[str | None] = mapped_column(String(8))
    held_by: Mapped[str | None] = mapped_column(String(255))
    hold_reason: Mapped[str | None] = mapped_column(String(1024))
    # `run --pty`: rank 0 runs under a pseudo-terminal that `attach` connects to (INTERACTIVE.md).
    interactive: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # `--network`: "private" (a network namespace of its own, nodes whose agent says "netns"
    # only), "host" (the node's), None: private where the node can, for a one-node job without
    # a container image, else the node's.
    network: Mapped[str | None] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[JobState] = mapped_column(
        _enum(JobState, 16), default=JobState.PENDING, index=True
    )
    state_reason: Mapped[str | None] = mapped_column(String(1024))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    requeue_count: Mapped[int] = mapped_column(Integer, default=0)
    # A requeued job may not start before this (the requeue backoff); None: at once.
    not_before: Mapped[datetime | None] = mapped_column()
    submitted_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    # Written by each scheduling cycle for pending jobs: what `explain` shows.
    priority: Mapped[float | None] = mapped_column(Float)
    pending_reasons: Mapped[list[dict[str, Any]] | None] = mapped_column()
    estimated_start_at: Mapped[datetime | None] = mapped_column()
    # Set when a preemption was decided: SIGKILL deadline for its tasks.
    preempt_deadline: Mapped[datetime | None] = mapped_column()
    borrowed: Mapped[bool] = mapped_column(Boolean, default=False)
    # An array's elements share `array_job_id`, the id of its first element (scheduler/
    # services/arrays.py); `array_limit` (`%N`): at most that many of them active at once.
    array_job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    array_task_id: Mapped[int | None] = mapped_column(Integer)
    array_limit: Mapped[int | None] = mapped_column(Integer)
    # Slurm's `singleton`: it starts only once no earlier job of its org with its name is
    # pending or active.
    singleton: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class JobDependency(Base):
    """The job may start only once `depends_on_id` has ended as `kind` asks: `afterok`
    (COMPLETED), `afterany` (ended at all), `afternotok` (ended other than COMPLETED)."""

    __tablename__ = "job_dependencies"

    job_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    depends_on_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="RESTRICT"), primary_key=True, index=True
    )
    kind: Mapped[str] = mapped_column(String(16), default="afterok", server_default="afterok")


class Task(Base):
    """One node's part of a job for one attempt (a requeued job gets new tasks)."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "node_rank"),
        # Log retention finds the tasks that ended before its cutoff.
        Index("ix_tasks_ended_at", "ended_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    node_rank: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[int | None] = mapped_column(
        ForeignKey("nodes.id", ondelete="SET NULL"), index=True
    )
    state: Mapped[JobState] = mapped_column(
        _enum(JobState, 16), default=JobState.STARTING, index=True
    )
    reason: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    stop_requested_at: Mapped[datetime | None] = mapped_column()
    stop_reason: Mapped[str | None] = mapped_column(String(255))
    stop_grace_s: Mapped[float | None] = mapped_column(Float)
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    log_complete: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # When the org's log budget deleted this (ended) task's log; reads say so instead of "".
    log_dropped_at: Mapped[datetime | None] = mapped_column()
    """The agent sent the last chunk of the ended task's log (its `eof`): a reader has it all."""


class Allocation(Base):
    """A GPU held by a task from `started_at` until `ended_at`.

    The partial unique index is the database's own guarantee that a GPU is held by at most one
    open allocation, whatever the code above it does.
    """

    __tablename__ = "allocations"
    __table_args__ = (
        Index(
            "uq_allocations_gpu_id_active",
            "gpu_id",
            unique=True,
            postgresql_where=text("ended_at IS NULL"),
            sqlite_where=text("ended_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="RESTRICT"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    # NULL once the GPU's node was deleted: the allocation stays in the ledger (`gpu_type`).
    gpu_id: Mapped[int | None] = mapped_column(ForeignKey("gpus.id", ondelete="SET NULL"))
    gpu_type: Mapped[str] = mapped_column(String(64))
    borrowed: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column()


class Event(Base):
    """Every state transition: who, when, why. Append-only."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))  # job.state, task.state, node.state, quota, ...
    job_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    # A deleted node's events stay (their reasons name it): SET NULL, not CASCADE.
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"))
    org_id: Mapped[int | None] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str | None] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))  # user:<name>, scheduler, agent:<node>
    reason: Mapped[str | None] = mapped_column(String(1024))
    details: Mapped[dict[str, Any] | None] = mapped_column()


class UsageRecord(Base):
    """The usage ledger: one row per allocation per hour it was open.

    Summing `gpu_seconds_allocated` over an allocation's rows gives its interval length; reports
    roll these up by org, user, GPU type and period.
    """

    __tablename__ = "usage_ledger"
    __table_args__ = (
        UniqueConstraint("allocation_id", "period_start"),
        Index("ix_usage_ledger_org_id_period_start", "org_id", "period_start"),
        # Deleting a job checks its ledger rows (the foreign key): without this, PostgreSQL
        # scans the whole ledger once per deleted job.
        Index("ix_usage_ledger_job_id", "job_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    allocation_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("allocations.id", ondelete="CASCADE")
    )
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="RESTRICT"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    gpu_type: Mapped[str] = mapped_column(String(64))
    period_start: Mapped[datetime] = mapped_column()
    gpu_seconds_allocated: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_seconds_busy: Mapped[float] = mapped_column(Float, default=0.0)
    billed_gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    energy_joules: Mapped[float] = mapped_column(Float, default=0.0)
    preempted: Mapped[bool] = mapped_column(Boolean, default=False)  # lost to preemption


class UsageRollup(Base):
    """The usage of jobs purged after `job_purge_after_s`: their ledger rows summed per org,
    user, GPU type, hour and preempted, written in the transaction that deletes them, so that
    usage reports (ledger plus rollup) add up to the same totals before and after a purge."""

    __tablename__ = "usage_rollup"
    __table_args__ = (Index("ix_usage_rollup_org_id_period_start", "org_id", "period_start"),)

    org_id: Mapped[int] = mapped_column(
        ForeignKey("orgs.id", ondelete="RESTRICT"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="RESTRICT"), primary_key=True
    )
    gpu_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    preempted: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    gpu_seconds_allocated: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_seconds_busy: Mapped[float] = mapped_column(Float, default=0.0)
    billed_gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    energy_joules: Mapped[float] = mapped_column(Float, default=0.0)


class LogChunk(Base):
    """Task output shipped by the agent, so that the server can serve logs without reaching it."""

    __tablename__ = "log_chunks"
    __table_args__ = (UniqueConstraint("task_id", "offset"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_id: Mapped[int] = mapped_column(BigId, ForeignKey("tasks.id", ondelete="CASCADE"))
    offset: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OrgLogBytes(Base):
    """Bytes of log text one org keeps in `log_chunks`, kept in the transaction that inserts or
    deletes its chunks (scheduler.services.logbudget), so that `org_log_max_bytes` is a bound
    read in one row."""

    __tablename__ = "org_log_bytes"

    org_id: Mapped[int] = mapped_column(
        ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class PendingJobCount(Base):
    """Pending jobs per user and per org, kept by a trigger on `jobs` (PostgreSQL only; see
    migrations/versions/*_tenant_limits.py), so that a submission reads its caps' counts in a
    few rows instead of counting jobs. Each owner's count is spread over
    16 rows (a job's slot is its id modulo 16), so that concurrent submissions of one user
    rarely wait for each other's row lock; the count is the sum of the slots."""

    __tablename__ = "pending_job_counts"

    owner_kind: Mapped[str] = mapped_column(String(4), primary_key=True)  # "user" | "org"
    owner_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)
