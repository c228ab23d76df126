"""Domain enumerations shared by the database, the services, the API and the CLI."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Slurm's words where they fit; tasks use the same states as their job."""

    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def is_active(self) -> bool:
        """Holding (or about to hold) GPUs."""
        return self in (JobState.STARTING, JobState.RUNNING)


TERMINAL_STATES = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
    }
)


class NodeState(StrEnum):
    READY = "ready"
    DRAINING = "draining"  # no new tasks; running tasks finish
    DRAINED = "drained"  # draining and empty
    DOWN = "down"  # missed heartbeats
    UNHEALTHY = "unhealthy"  # GPU errors


class GpuHealth(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # XID or ECC errors: not allocated
    LOST = "lost"  # fell off the bus


class Role(StrEnum):
    MEMBER = "member"
    ORG_ADMIN = "org-admin"
    PLATFORM_ADMIN = "platform-admin"


class TokenKind(StrEnum):
    USER = "user"  # a person's API token
    AGENT = "agent"  # a node's credential: speaks only the agent protocol for that node
    JOIN = "join"  # lets an agent register a new node
