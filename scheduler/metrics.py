"""The server's Prometheus metrics, named after Kueue's so existing dashboards translate.

Two sources: instruments updated by the scheduler loop on the leader (cycles, their duration,
preemptions, admission waits, pending reasons of the last cycle), and gauges read from the
database at scrape time with a few grouped queries (jobs, nodes, GPUs, quotas, allocations, fair
share), so any replica answers a scrape with the cluster's state. Each runtime has its own
`CollectorRegistry`: several apps in one process (tests) never collide. A scrape also carries
`PROCESS_REGISTRY`: instruments of the process as a whole (the API's direct-route counters) and
its CPU and memory.

With several processes on a host (`fairgpu server --workers N` and its scheduler process),
`fairgpu server` sets `PROMETHEUS_MULTIPROC_DIR`: every process writes its instruments there and
whichever worker answers a scrape sums them (Prometheus' multiprocess mode), so the scheduler
process's cycles and the leader gauge are seen through any worker.

| fairgpu                                   | Kueue                                        |
| ----------------------------------------- | -------------------------------------------- |
| fairgpu_pending_jobs{org,reason}          | kueue_pending_workloads{cluster_queue,status}|
| fairgpu_running_jobs{org}                 | kueue_admitted_active_workloads              |
| fairgpu_org_guaranteed_gpus{org,gpu_type} | kueue_cluster_queue_nominal_quota            |
| fairgpu_org_limit_gpus{org,gpu_type}      | kueue_cluster_queue_borrowing_limit (+nominal)|
| fairgpu_org_allocated_gpus{org,gpu_type}  | kueue_cluster_queue_resource_usage           |
| fairgpu_org_borrowed_gpus{org,gpu_type}   | (usage above nominal quota)                  |
| fairgpu_org_fairshare_factor{org}         | kueue_cluster_queue_weighted_share           |
| fairgpu_admission_wait_seconds{org}       | kueue_admission_wait_time_seconds            |
| fairgpu_preemptions_total{reason}         | kueue_preempted_workloads_total{reason}      |
| fairgpu_scheduling_cycle_duration_seconds | kueue_admission_attempt_duration_seconds     |
| fairgpu_scheduling_cycles_total{result}   | kueue_admission_attempts_total{result}       |
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import GpuHealth, JobState
from scheduler.core import capacity_usage, tree_standing
from scheduler.core.types import Node, Org, PolicyConfig
from scheduler.db import Allocation, Gpu, Job, OrgUsage, Quota
from scheduler.db import Node as NodeRow
from scheduler.db import Org as OrgRow
from scheduler.states import NodeState

if TYPE_CHECKING:
    from scheduler.services.scheduling import CycleResult

PREFIX = "fairgpu"
# 1 s … 7 days: a queue wait is seconds on an idle cluster and days on a contended one.
ADMISSION_WAIT_BUCKETS_S = (
    1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400, 172800,
    345600, 604800,
)  # fmt: skip
# Instruments of the whole process, whichever app in it they count for.
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=PROCESS_REGISTRY)

CYCLE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class SchedulerMetrics:
    """Instruments the scheduler loop updates, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.leader = Gauge(
            f"{PREFIX}_scheduler_leader",
            "1 when this replica holds the scheduler lease and runs the cycle.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cycles = Counter(
            f"{PREFIX}_scheduling_cycles",
            "Scheduling cycles by result (ok, fenced: lease lost, error).",
            ["result"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            f"{PREFIX}_scheduling_cycle_duration_seconds",
            "Wall time of one cycle: load, decide and apply.",
            buckets=CYCLE_BUCKETS_S,
            registry=r,
        )
        self.preemptions = Counter(
            f"{PREFIX}_preemptions",
            "Jobs preempted, by reason (reclaim of a guarantee, priority, consolidate).",
            ["reason"],
            registry=r,
        )
        self.admission_wait = Histogram(
            f"{PREFIX}_admission_wait_seconds",
            "Time from submission to the start decision, per admitted job.",
            ["org"],
            buckets=ADMISSION_WAIT_BUCKETS_S,
            registry=r,
        )
        self.started = Counter(
            f"{PREFIX}_jobs_started",
            "Jobs given GPUs by the scheduler.",
            registry=r,
        )
        self.pending = Gauge(
            f"{PREFIX}_pending_jobs",
            "Pending jobs by org and their first reason at the last cycle (Slurm's words).",
            ["org", "reason"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.purged = Counter(
            f"{PREFIX}_retention_purged_rows",
            "Rows deleted by retention, by table (log_chunks: task_log_retention_s; events, "
            "and jobs that never started: job_detail_retention_s; jobs that ran: "
            "job_purge_after_s; events of no job, api_tokens and disabled users that own "
            "nothing: audit_retention_s).",
            ["table"],
            registry=r,
        )
        for table in ("log_chunks", "events", "jobs", "api_tokens", "users"):
            self.purged.labels(table=table)
        self.pending_by_reason: dict[tuple[str, str], int] = {}
        self.cycles.labels(result="ok")
        self.leader.set(0)

    def observe_cycle(self, result: CycleResult) -> None:
        self.cycles.labels(result="ok").inc()
        self.cycle_duration.observe(result.duration_s)
        for _, reason in result.applied.preempted:
            self.preemptions.labels(reason=reason).inc()
        for org, wait_s in result.applied.admission_waits:
            self.admission_wait.labels(org=org).observe(wait_s)
        self.started.inc(len(result.applied.started))
        loaded, decisions = result.loaded, result.decisions
        if loaded is None or decisions is None:
            return
        org_of = {p.job_id: p.org_id for p in loaded.snapshot.pending}
        started = set(result.applied.started)
        tally: Tally[tuple[str, str]] = Tally()
        for job_id, code in decisions.reasons.items():
            if job_id in started:
                continue
            reason = code.value
            org_id = org_of.get(job_id)
            tally[(loaded.org_names.get(org_id, str(org_id)) if org_id else "", reason)] += 1
        for key in self.pending_by_reason.keys() - tally.keys():
            self.pending.labels(*key).set(0)  # what another process's scrape reads from now on
            if multiprocess_dir() is None:  # (multiprocess mode cannot remove a series)
                self.pending.remove(*key)
        for key, n in tally.items():
            self.pending.labels(*key).set(n)
        self.pending_by_reason = dict(tally)


@dataclass
class ClusterStats:
    """Gauges read from the database at scrape time."""

    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (org, state)
    nodes: dict[str, int] = field(default_factory=dict)
    gpus: dict[tuple[str, str], int] = field(default_factory=dict)  # (gpu_type, health)
    guaranteed: dict[tuple[str, str], int] = field(default_factory=dict)
    limit: dict[tuple[str, str], int] = field(default_factory=dict)
    allocated: dict[tuple[str, str], int] = field(default_factory=dict)
    borrowed: dict[tuple[str, str], int] = field(default_factory=dict)
    fairshare: dict[str, float] = field(default_factory=dict)


async def read_cluster(session: AsyncSession, config: PolicyConfig) -> ClusterStats:
    stats = ClusterStats()
    names = dict((await session.execute(select(OrgRow.id, OrgRow.name))).all())
    for org_id, state, n in await session.execute(
        select(Job.org_id, Job.state, func.count())
        .where(Job.state.in_([JobState.PENDING, JobState.STARTING, JobState.RUNNING]))
        .group_by(Job.org_id, Job.state)
    ):
        stats.jobs[(names.get(org_id, str(org_id)), JobState(state).value)] = n
    for node_state, n in await session.execute(
        select(NodeRow.state, func.count()).group_by(NodeRow.state)
    ):
        stats.nodes[NodeState(node_state).value] = n
    for gpu_type, health, n in await session.execute(
        select(Gpu.model, Gpu.health, func.count()).group_by(Gpu.model, Gpu.health)
    ):
        stats.gpus[(gpu_type, GpuHealth(health).value)] = n
    for org_id, gpu_type, guaranteed, limit in await session.execute(
        select(Quota.org_id, Quota.gpu_type, Quota.guaranteed, Quota.limit)
    ):
        key = (names.get(org_id, str(org_id)), gpu_type)
        stats.guaranteed[key] = guaranteed
        if limit is not None:
            stats.limit[key] = limit
    for org_id, gpu_type, borrowed, n in await session.execute(
        select(Allocation.org_id, Allocation.gpu_type, Allocation.borrowed, func.count())
        .where(Allocation.ended_at.is_(None))
        .group_by(Allocation.org_id, Allocation.gpu_type, Allocation.borrowed)
    ):
        key = (names.get(org_id, str(org_id)), gpu_type)
        stats.allocated[key] = stats.allocated.get(key, 0) + n
        if borrowed:
            stats.borrowed[key] = stats.borrowed.get(key, 0) + n
    usage = dict(
        (await session.execute(select(OrgUsage.org_id, OrgUsage.decayed_gpu_seconds))).all()
    )
    orgs = [
        Org(id=o.id, name=o.name, parent_id=o.parent_id, shares=o.shares, usage=usage.get(o.id, 0))
        for o in await session.execute(
            select(OrgRow.id, OrgRow.name, OrgRow.parent_id, OrgRow.shares)
        )
    ]
    per_type = Tally[str]()
    for (gpu_type, _health), n in stats.gpus.items():
        per_type[gpu_type] += n
    nodes = [
        Node(id=i, name=t, site="", domain="", gpu_type=t, gpus=tuple(range(n)))
        for i, (t, n) in enumerate(sorted(per_type.items()))
    ]
    _, _, factor = tree_standing(orgs, capacity_usage(nodes, config))
    stats.fairshare = {names[oid]: f for oid, f in factor.items() if oid in names}
    return stats


def _gauge(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    for key, value in sorted(values):
        family.add_metric(list(key), value)
    return family


class _Scrape(Collector):
    def __init__(self, metrics: SchedulerMetrics, stats: ClusterStats) -> None:
        self.metrics = metrics
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if multiprocess_dir() is not None:
            yield from MultiProcessCollector(None).collect()  # type: ignore[no-untyped-call]
        else:
            yield from self.metrics.registry.collect()
            yield from PROCESS_REGISTRY.collect()
        yield _gauge(
            "jobs",
            "Jobs not yet ended, by org and state (PENDING, STARTING, RUNNING).",
            ["org", "state"],
            s.jobs.items(),
        )
        running: Tally[str] = Tally()
        for (org, state), n in s.jobs.items():
            if state in (JobState.STARTING.value, JobState.RUNNING.value):
                running[org] += n
        yield _gauge(
            "running_jobs",
            "Jobs holding GPUs (STARTING or RUNNING), by org.",
            ["org"],
            (((org,), n) for org, n in running.items()),
        )
        for name, doc, values in (
            ("org_guaranteed_gpus", "GPUs guaranteed to the org (nominal quota).", s.guaranteed),
            ("org_limit_gpus", "Most GPUs the org may hold, borrowing included.", s.limit),
            ("org_allocated_gpus", "GPUs the org's jobs hold now.", s.allocated),
            (
                "org_borrowed_gpus",
                "GPUs held beyond the org's guarantee (reclaimable).",
                s.borrowed,
            ),
        ):
            yield _gauge(name, doc, ["org", "gpu_type"], values.items())
        yield _gauge(
            "org_fairshare_factor",
            "Fair-share factor 2^(-U/S): 1 unused, 0.5 at its share, towards 0 above.",
            ["org"],
            (((org,), f) for org, f in s.fairshare.items()),
        )
        yield _gauge("nodes", "Nodes by state.", ["state"], (((k,), n) for k, n in s.nodes.items()))
        yield _gauge("gpus", "GPUs by type and health.", ["gpu_type", "health"], s.gpus.items())


def multiprocess_dir() -> str | None:
    """Where the host's processes share their instruments, when `fairgpu server` set it."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render(metrics: SchedulerMetrics, stats: ClusterStats) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(metrics, stats))
    return generate_latest(registry)
