"""A cluster's recorded history as the simulator replays it: jobs, their attempts, the cluster.

Plain data, read from the server's database by `scheduler.sim.fromdb` and turned here into a
simulator workload. Times are UTC epoch seconds until `to_trace` makes them relative to the
first replayed submission.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scheduler.core.types import Node, Org
from scheduler.sim.trace import TraceJob


@dataclass(frozen=True, slots=True)
class RecordedAttempt:
    """One run of a job: from its GPUs being given (allocations opened) to their release."""

    start_s: float
    end_s: float
    borrowed: bool = False


@dataclass(frozen=True, slots=True)
class RecordedJob:
    """A job that held GPUs in the window. Every attempt but the last was requeued."""

    job_id: int
    org: str
    submitted_s: float
    gpus_per_node: int
    nodes: int
    time_limit_s: float
    attempts: tuple[RecordedAttempt, ...]
    state: str  # its final state, or RUNNING when still running at read time (censored)
    gpu_type: str | None = None
    site: str | None = None
    preemptible: bool = False
    priority_class: str = "normal"

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True, slots=True)
class History:
    """What `--from-db` read: the window, the org tree with its quotas, the nodes, the jobs."""

    since_s: float
    until_s: float
    orgs: tuple[Org, ...]  # quotas as recorded now
    nodes: tuple[Node, ...]  # ids renumbered 1..N, as the simulator indexes them
    jobs: tuple[RecordedJob, ...]  # replayed, in submit order
    left_out: dict[str, int] = field(default_factory=dict)  # jobs not replayed, by why

    @property
    def censored(self) -> int:
        """Jobs still holding GPUs at read time, replayed as if they ended then."""
        return sum(1 for j in self.jobs if j.state == "RUNNING")

    @property
    def start_s(self) -> float:
        """Virtual time 0: the first replayed submission (no idle lead-in skews allocation)."""
        return min((j.submitted_s for j in self.jobs), default=self.since_s)


def kept_s(ran_s: float, checkpoint_interval_s: float) -> float:
    """The work a preempted attempt keeps: up to its last checkpoint, as the simulator assumes."""
    return math.floor(ran_s / checkpoint_interval_s) * checkpoint_interval_s


def work_s(job: RecordedJob, checkpoint_interval_s: float) -> float:
    """The run time the job needs in a replay: its last attempt plus what earlier ones kept."""
    *earlier, last = job.attempts
    kept = sum(kept_s(a.end_s - a.start_s, checkpoint_interval_s) for a in earlier)
    return kept + (last.end_s - last.start_s)


def to_trace(history: History, checkpoint_interval_s: float) -> list[TraceJob]:
    """Recorded jobs as simulator input, with their recorded shape, limit and preemptibility.

    A job that did not end as TIMEOUT gets a limit of at least its run time: the seconds its
    agent took to start it count in the run time but not against the limit it asked for.
    """
    t0 = history.start_s
    out: list[TraceJob] = []
    for job in history.jobs:
        duration_s = work_s(job, checkpoint_interval_s)
        limit_s = job.time_limit_s
        if job.state != "TIMEOUT":
            limit_s = max(limit_s, duration_s)
        out.append(
            TraceJob(
                name=str(job.job_id),
                tenant=job.org,
                submit_time_s=job.submitted_s - t0,
                duration_s=duration_s,
                num_gpus=job.gpus,
                gpu_type=job.gpu_type,
                gpus_per_node=job.gpus_per_node,
                time_limit_s=max(limit_s, 1.0),
                preemptible=job.preemptible,
                site=job.site,
                priority_class=job.priority_class,
            )
        )
    return out
