"""Node, GPU and usage-report schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from api.schemas.common import InputModel, OutputModel, Reason
from protocol.states import GpuHealth
from scheduler.states import NodeState


class GpuPublic(OutputModel):
    id: int
    index: int
    uuid: str
    model: str
    memory_bytes: int
    health: GpuHealth
    health_reason: str | None
    allocated: bool = False
    allocated_job_id: int | None = None
    """Only for jobs of the caller's own org (platform admins: every job)."""
    last_sample: dict[str, Any] | None
    """The GPU's latest sample; none (and no time) while another org's job holds it."""
    last_sample_at: datetime | None


class NodePublic(OutputModel):
    id: int
    name: str
    site: str
    domain: str
    state: NodeState
    state_reason: str | None
    hostname: str
    agent_version: str
    isolation: str = "none"
    """How its agent confines tasks: "strict" (each task as its org's uid, in its own cgroup and
    mount namespace, with only its own GPUs) or "none". Jobs of an org that requires isolation
    run only on "strict" nodes."""
    memory_per_gpu_bytes: int | None = None
    """Each GPU's share of the memory the node's tasks may hold, as its agent reported it: a
    job's `--mem` over its GPUs per node must fit in it to be placed here. None: unknown (an
    older agent, or one without isolation, which limits nothing): any job is placed."""
    registered_at: datetime
    last_heartbeat_at: datetime | None
    gpus: list[GpuPublic]
    gpus_total: int
    gpus_allocated: int
    gpus_healthy: int


class NodesPublic(OutputModel):
    data: list[NodePublic]
    count: int
    next_cursor: str | None = None


class DrainRequest(InputModel):
    reason: Reason = "drained by an administrator"


class UsageRow(OutputModel):
    period_start: datetime
    key: str
    """The org, user or GPU type this row is about (see `by`)."""
    gpu_hours_allocated: float
    gpu_hours_busy: float
    billed_gpu_hours: float
    energy_joules: float
    preempted_gpu_hours: float


class UsageReport(OutputModel):
    by: str
    period: str
    since: datetime
    until: datetime
    data: list[UsageRow]


class NodeApproved(OutputModel):
    node_id: int
    name: str
    approved_until: datetime
    """One join-token registration of this name may take the node over until then."""
