"""States both sides use: jobs and tasks on the server, tasks and GPU health on the node."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


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


class GpuHealth(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # XID or ECC errors: not allocated
    LOST = "lost"  # fell off the bus


TaskState = Literal[
    "starting", "running", "exited", "stopped", "timeout", "failed_to_start", "lost"
]
"""A task as its agent reports it; the server maps these to job states (protocol.agent)."""
TERMINAL_TASK_STATES: frozenset[str] = frozenset(
    {"exited", "stopped", "timeout", "failed_to_start", "lost"}
)
