"""What a simulated run leaves behind: per-job records, run counters and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.core.types import Org, PendingJob, Placement
from scheduler.sim.idle import NO_SHAPE, Shape
from scheduler.sim.timeline import Timeline
from scheduler.sim.trace import TraceJob


class SimulationError(RuntimeError):
    """The core returned a decision that breaks an invariant (a GPU given twice, say)."""


@dataclass(slots=True)
class SimJob:
    """One trace job's life in the simulator; the record the metrics are computed from."""

    job_id: int
    trace: TraceJob
    org_index: int
    gpus: int
    pending: PendingJob | None
    remaining_s: float  # work still to do, counted from the last checkpoint
    time_limit_s: float
    attempt: int = 0
    start_s: float = -1.0  # start of the current attempt
    first_start_s: float = -1.0
    end_s: float = -1.0
    queued_since_s: float = 0.0
    wait_s: float = 0.0  # time spent pending, over every attempt
    run_s: float = 0.0  # time spent holding GPUs, over every attempt
    preemptions: int = 0
    lost_gpu_s: float = 0.0
    borrowed: bool = False
    outcome: str = "UNFINISHED"  # COMPLETED | TIMEOUT | UNSCHEDULABLE | UNFINISHED
    placements: tuple[Placement, ...] = ()
    shape: Shape = NO_SHAPE  # for the idle ledger; set with `pending`


@dataclass(slots=True)
class RunStats:
    cycles: int = 0
    core_s: float = 0.0
    snapshot_s: float = 0.0
    wall_s: float = 0.0
    starts: int = 0
    preemptions_sent: int = 0
    max_pending: int = 0
    skipped_cycles: int = 0
    end_s: float = 0.0
    starved_max_s: list[float] = field(default_factory=list)  # per org, longest span
    starved_total_s: list[float] = field(default_factory=list)
    idle_gpu_s: dict[str, float] = field(default_factory=dict)  # while work waits, by cause


@dataclass(slots=True)
class SimResult:
    policy: str
    jobs: list[SimJob]
    timeline: Timeline
    orgs: tuple[Org, ...]
    total_gpus: int
    stats: RunStats = field(default_factory=RunStats)
