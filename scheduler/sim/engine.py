"""The discrete-event loop: trace arrivals, job ends and preemption kills in virtual time.

The simulator drives the real `scheduler.core.schedule` in coalesced cycles: a cycle runs only
when something changed (an arrival, freed GPUs) and at most once per `cycle_interval_s` (1 s, as
the server, which cycles on events no closer than four times its last cycle's duration), plus
a slow idle cycle while jobs wait so that ageing and decayed usage can reorder them. Snapshot
pieces are kept between cycles and rebuilt only when they changed.
"""

from __future__ import annotations

import functools
import gc
import heapq
import math
import operator
import time
from collections.abc import Callable, Sequence

from scheduler.core.types import (
    Decisions,
    Node,
    Org,
    PendingJob,
    Placement,
    PolicyConfig,
    ReasonCode,
    RunningChanges,
    RunningJob,
    Snapshot,
)
from scheduler.sim.cluster import gang_shape
from scheduler.sim.config import SimConfig
from scheduler.sim.idle import IdleLedger, Shape
from scheduler.sim.records import RunStats, SimJob, SimResult, SimulationError
from scheduler.sim.timeline import Timeline
from scheduler.sim.trace import TraceJob

ScheduleFn = Callable[[Snapshot], Decisions]
ProgressFn = Callable[[float, int], None]  # (virtual now, jobs finished)

_END, _KILL = 0, 1
_INF = math.inf


class Simulator:
    """One policy over one trace. Build it, call `run()` once."""

    def __init__(
        self,
        *,
        policy: str,
        trace: Sequence[TraceJob],
        nodes: tuple[Node, ...],
        orgs: tuple[Org, ...],
        policy_config: PolicyConfig,
        sim_config: SimConfig,
        schedule: ScheduleFn,
        progress: ProgressFn | None = None,
    ) -> None:
        self.policy = policy
        self.nodes = nodes
        self.orgs = orgs
        self.config = policy_config
        self.sim = sim_config
        self.schedule = schedule
        self.progress = progress
        self.total_gpus = sum(len(n.gpus) for n in nodes)
        self.org_index = {o.name: i for i, o in enumerate(orgs)}
        self.guaranteed = [sum(o.guaranteed.values()) for o in orgs]
        self.gpu_types = {n.gpu_type for n in nodes}
        self.jobs = self._make_jobs(trace)
        self.timeline = Timeline(len(orgs))
        self.idle = IdleLedger(nodes, policy_config.backfill)
        self.stats = RunStats()
        # Live state.
        self.now = 0.0
        self.pending: dict[int, PendingJob] = {}
        self.running: dict[int, RunningJob] = {}
        self.busy: set[tuple[int, int]] = set()
        self.allocated = 0
        self.org_alloc = [0] * len(orgs)
        self.org_demand = [0] * len(orgs)
        self.org_borrowed = [0] * len(orgs)
        self.weighted_alloc = [0.0] * len(orgs)
        self.usage = [o.usage for o in orgs]
        self.usage_at = [0.0] * len(orgs)
        self.decay_rate = math.log(2) / policy_config.half_life_s
        self.weight_of = {n.gpu_type: policy_config.gpu_weights.get(n.gpu_type, 1.0) for n in nodes}
        self._events: list[tuple[float, int, int, int, int]] = []  # (t, seq, kind, job, attempt)
        self._seq = 0
        self._pending_tuple: tuple[PendingJob, ...] | None = ()
        self._running_tuple: tuple[RunningJob, ...] | None = ()
        # What changed in `running` since the tuple the core last saw (`_base`): job id → its
        # new object, or None when it is gone; `_fresh`: jobs started since, not in `_base`.
        # The core's kept `Scheduler` corrects its running-job tables with them.
        self._base: tuple[RunningJob, ...] | None = None
        self._changed: dict[int, RunningJob | None] = {}
        self._fresh: set[int] = set()
        self._protected: list[tuple[float, int]] = []  # (end of min runtime, job) of borrowers
        self.finished = 0
        self._strict_fifo = policy_config.ordering == "fifo" and not policy_config.backfill
        self._head_gpus = 0  # GPUs of the strict-FIFO head that could not start, or 0
        # In-quota starvation: an org has a pending job that fits in its unused guarantee.
        self.org_pending_sizes: list[dict[int, int]] = [{} for _ in orgs]
        self.starved_since: list[float | None] = [None] * len(orgs)
        self.starved_max_s = [0.0] * len(orgs)
        self.starved_total_s = [0.0] * len(orgs)

    def _make_jobs(self, trace: Sequence[TraceJob]) -> list[SimJob]:
        """Turn trace rows into jobs; ones that no node set could ever hold are set aside."""
        per_type: dict[str, list[int]] = {}
        for node in self.nodes:
            per_type.setdefault(node.gpu_type, []).append(len(node.gpus))
        gpn = max((len(n.gpus) for n in self.nodes), default=self.sim.gpus_per_node)
        jobs: list[SimJob] = []
        wide_enough: dict[tuple[str | None, int], int] = {}
        for i, row in enumerate(trace):
            org = self.org_index[row.tenant]
            preemptible = self.sim.preemptible if row.preemptible is None else row.preemptible
            can_borrow = self.config.borrowing and preemptible
            if row.gpus_per_node:
                per_node, count = row.gpus_per_node, row.num_gpus // row.gpus_per_node
            else:
                per_node, count = gang_shape(row.num_gpus, gpn)
            # Nodes wide enough for one task, per (type, GPUs per node): a handful of shapes
            # for the whole trace, rather than a pass over every node per job.
            wide = wide_enough.get((row.gpu_type, per_node))
            if wide is None:
                sizes = (
                    per_type.get(row.gpu_type, [])
                    if row.gpu_type
                    else functools.reduce(operator.iadd, per_type.values(), [])
                )
                wide = wide_enough[(row.gpu_type, per_node)] = sum(
                    1 for s in sizes if s >= per_node
                )
            fits = wide >= count
            job_id = i + 1
            pending = PendingJob(
                job_id=job_id,
                org_id=self.orgs[org].id,
                user_id=org + 1,
                gpus_per_node=per_node,
                nodes=count,
                time_limit_s=row.time_limit_s or self.sim.time_limit_s(row.duration_s),
                submitted_at=row.submit_time_s,
                gpu_type=row.gpu_type,
                site=row.site,
                priority_class=row.priority_class,
                preemptible=preemptible,
            )
            job = SimJob(
                job_id, row, org, row.num_gpus, pending, row.duration_s, pending.time_limit_s
            )
            limit = _limit(self.orgs[org], row.gpu_type, self.gpu_types)
            cap = _INF if limit is None else limit
            job.shape = Shape(
                org,
                per_node,
                count,
                row.gpu_type,
                row.site,
                cap if can_borrow else min(cap, self.guaranteed[org]),
            )
            if (
                not fits
                or (not can_borrow and row.num_gpus > self.guaranteed[org])
                or (limit is not None and row.num_gpus > limit)
            ):
                # No node set could hold it, or its org may never hold that much.
                job.pending, job.outcome = None, "UNSCHEDULABLE"
            jobs.append(job)
        return jobs

    # -- event loop ---------------------------------------------------------------------

    def run(self) -> SimResult:
        """Replay the trace to its end.

        The cyclic garbage collector is paused for the run: every cycle allocates hundreds of
        thousands of small objects, none of them in reference cycles, and collections triggered
        by those allocations would walk the whole simulation state again and again.
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if was_enabled:
                gc.enable()

    def _run(self) -> SimResult:
        wall0 = time.perf_counter()
        arrivals = [j for j in self.jobs if j.pending is not None]
        n_arrivals, ai = len(arrivals), 0
        interval = self.sim.cycle_interval_s
        last_cycle = -_INF
        next_cycle = _INF
        events = self._events
        steps = 0
        while True:
            t_event = events[0][0] if events else _INF
            t_arrival = arrivals[ai].trace.submit_time_s if ai < n_arrivals else _INF
            t = min(t_event, t_arrival, next_cycle)
            if t == _INF:
                break
            changed = False
            if t_event == t:
                _, _, kind, job_id, attempt = heapq.heappop(events)
                changed = self._on_end(t, self.jobs[job_id - 1], attempt, kind)
            elif t_arrival == t:
                changed = self._on_arrival(t, arrivals[ai])
                ai += 1
            else:
                next_cycle = _INF
                if self._worth_cycling():
                    last_cycle = t
                    self._cycle(t)
                else:
                    self.stats.skipped_cycles += 1
                    self.idle.looked()
                wake = self._next_wake(t, bool(events) or ai < n_arrivals)
                if wake < _INF:
                    next_cycle = max(wake, last_cycle + interval)
            self.idle.update(t, bool(self.pending), self.org_alloc)
            if changed and next_cycle == _INF:
                next_cycle = max(t, last_cycle + interval)
            elif changed:
                next_cycle = min(next_cycle, max(t, last_cycle + interval))
            steps += 1
            if self.progress is not None and steps % 4096 == 0:
                self.progress(self.now, self.finished)
        self.stats.wall_s = time.perf_counter() - wall0
        self.stats.end_s = self.now
        for org, since in enumerate(self.starved_since):
            if since is not None:  # still starved when nothing more could happen
                self.starved_max_s[org] = max(self.starved_max_s[org], self.now - since)
                self.starved_total_s[org] += self.now - since
        self.stats.starved_max_s = self.starved_max_s
        self.stats.starved_total_s = self.starved_total_s
        self.stats.idle_gpu_s = self.idle.by_cause()
        if self.progress is not None:
            self.progress(self.now, self.finished)
        return SimResult(
            self.policy, self.jobs, self.timeline, self.orgs, self.total_gpus, self.stats
        )

    def _worth_cycling(self) -> bool:
        """False only when the core could neither start nor preempt anything now.

        A start needs a pending job that fits in the free GPUs (by count) within what its org
        may hold; under strict FIFO, the blocked head must fit first. A reclaim needs an org
        with a pending job inside its unused guarantee. Checking this costs a few operations
        per org, while a cycle costs the core time proportional to the queue.
        """
        if not self.pending:
            return False
        if not self.sim.gate_cycles:
            return True
        if self.config.preemption and any(s is not None for s in self.starved_since):
            return True
        free = self.total_gpus - self.allocated
        if self._head_gpus:
            return self._head_gpus <= free
        can_borrow = self.config.borrowing and self.sim.preemptible
        for org, sizes in enumerate(self.org_pending_sizes):
            if sizes:
                smallest = min(sizes)
                if smallest <= free and (
                    can_borrow or self.org_alloc[org] + smallest <= self.guaranteed[org]
                ):
                    return True
        return False

    def _next_wake(self, t: float, more_to_come: bool) -> float:
        """When to look again with no event: while jobs wait and anything can still change."""
        if not self.pending or not more_to_come:
            return _INF
        wake = t + self.sim.idle_cycle_interval_s
        protected = self._protected
        while protected and (
            protected[0][0] <= t or self.jobs[protected[0][1] - 1].job_id not in self.running
        ):
            heapq.heappop(protected)
        if protected and any(s is not None for s in self.starved_since):
            wake = min(wake, protected[0][0])  # a starved org may reclaim from it then
        return wake

    def _push(self, t: float, kind: int, job: SimJob) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, job.job_id, job.attempt))

    def _advance_usage(self, org: int, t: float) -> None:
        """Decayed usage in closed form: U(t) = U0 e^-kt + a (1 - e^-kt) / k for constant a."""
        dt = t - self.usage_at[org]
        if dt > 0:
            decay = math.exp(-self.decay_rate * dt)
            self.usage[org] = (
                self.usage[org] * decay + self.weighted_alloc[org] * (1 - decay) / self.decay_rate
            )
            self.usage_at[org] = t

    def _queue(self, job: SimJob, delta: int) -> None:
        self.idle.queue(job.shape, delta)
        sizes = self.org_pending_sizes[job.org_index]
        count = sizes.get(job.gpus, 0) + delta
        if count:
            sizes[job.gpus] = count
        else:
            del sizes[job.gpus]

    def _record(self, t: float, org: int) -> None:
        sizes = self.org_pending_sizes[org]
        starved = bool(sizes) and self.org_alloc[org] + min(sizes) <= self.guaranteed[org]
        since = self.starved_since[org]
        if starved and since is None:
            self.starved_since[org] = t
        elif not starved and since is not None:
            self.starved_since[org] = None
            self.starved_max_s[org] = max(self.starved_max_s[org], t - since)
            self.starved_total_s[org] += t - since
        self.timeline.org_changed(
            t, org, self.org_alloc[org], self.org_demand[org], self.org_borrowed[org]
        )
        self.timeline.cluster_changed(t, self.allocated, bool(self.pending))

    def _on_arrival(self, t: float, job: SimJob) -> bool:
        self.now = t
        assert job.pending is not None
        self.pending[job.job_id] = job.pending
        self._pending_tuple = None
        self._queue(job, 1)
        job.queued_since_s = t
        self.org_demand[job.org_index] += job.gpus
        self._record(t, job.org_index)
        return True

    def _on_end(self, t: float, job: SimJob, attempt: int, kind: int) -> bool:
        if attempt != job.attempt or job.job_id not in self.running:
            return False  # a kill for a job that already ended, or an end for a killed attempt
        self.now = t
        ran_s = t - job.start_s
        self._release(t, job)
        if kind == _KILL:
            kept_s = math.floor(ran_s / self.sim.checkpoint_interval_s) * (
                self.sim.checkpoint_interval_s
            )
            kept_s = min(kept_s, job.remaining_s)
            job.lost_gpu_s += (ran_s - kept_s) * job.gpus
            job.remaining_s -= kept_s
            job.preemptions += 1
            job.attempt += 1
            assert job.pending is not None
            self.pending[job.job_id] = job.pending  # requeued; keeps its submit time (age)
            self._pending_tuple = None
            self._queue(job, 1)
            job.queued_since_s = t
        else:
            job.remaining_s = max(job.remaining_s - ran_s, 0.0)
            job.end_s = t
            job.outcome = "COMPLETED" if job.remaining_s <= 1e-9 else "TIMEOUT"
            self.org_demand[job.org_index] -= job.gpus
            self.finished += 1
        self._record(t, job.org_index)
        return True

    def _release(self, t: float, job: SimJob) -> None:
        org = job.org_index
        self._advance_usage(org, t)
        del self.running[job.job_id]
        self._running_tuple = None
        if job.job_id in self._fresh:  # started since the core last looked: it never saw it
            self._fresh.discard(job.job_id)
            del self._changed[job.job_id]
        else:
            self._changed[job.job_id] = None
        for placement in job.placements:
            self.idle.give(placement.node_id, len(placement.gpus))
            for gpu in placement.gpus:
                self.busy.discard((placement.node_id, gpu))
        job.run_s += t - job.start_s
        self.allocated -= job.gpus
        self.org_alloc[org] -= job.gpus
        self.weighted_alloc[org] -= job.gpus * self._weight(job)
        if job.borrowed:
            self.org_borrowed[org] -= job.gpus

    def _weight(self, job: SimJob) -> float:
        node = self.nodes[job.placements[0].node_id - 1]
        return self.weight_of[node.gpu_type]

    # -- scheduling cycles --------------------------------------------------------------

    def snapshot(self, t: float) -> Snapshot:
        for org in range(len(self.orgs)):
            self._advance_usage(org, t)
        orgs = tuple(
            Org(
                id=o.id,
                name=o.name,
                parent_id=o.parent_id,
                shares=o.shares,
                guaranteed=o.guaranteed,
                limit=o.limit,
                usage=self.usage[i],
            )
            for i, o in enumerate(self.orgs)
        )
        if self._pending_tuple is None:
            self._pending_tuple = tuple(self.pending.values())
        if self._running_tuple is None:
            self._running_tuple = tuple(self.running.values())
        base, running = self._base, self._running_tuple
        changes = None
        if base is not None:
            changed = self._changed
            put = tuple(r for r in changed.values() if r is not None)
            changes = RunningChanges(base, put, tuple(j for j, r in changed.items() if r is None))
        self._base = running
        self._changed = {}
        self._fresh = set()
        return Snapshot(
            now=t,
            nodes=self.nodes,
            orgs=orgs,
            running=running,
            pending=self._pending_tuple,
            config=self.config,
            running_changes=changes,
        )

    def _cycle(self, t: float) -> None:
        self.now = t
        if not self.pending:
            return
        t0 = time.perf_counter()
        snapshot = self.snapshot(t)
        t1 = time.perf_counter()
        decisions = self.schedule(snapshot)
        t2 = time.perf_counter()
        self.stats.snapshot_s += t1 - t0
        self.stats.core_s += t2 - t1
        self.stats.cycles += 1
        self.stats.max_pending = max(self.stats.max_pending, len(self.pending))
        if self._strict_fifo:  # the head that blocks the queue, if any (Resources)
            self._head_gpus = next(
                (
                    self.jobs[job_id - 1].gpus
                    for job_id, code in decisions.reasons.items()
                    if code is ReasonCode.RESOURCES
                ),
                0,
            )
        self.idle.looked()
        self.idle.reserve(decisions.reserved)
        for preemption in decisions.preemptions:
            self._preempt(t, preemption.job_id, preemption.deadline)
        for start in decisions.starts:
            self._start(t, start.job_id, start.placements, start.borrowed)

    def _preempt(self, t: float, job_id: int, deadline: float) -> None:
        current = self.running.get(job_id)
        if current is None:
            raise SimulationError(f"core preempted job {job_id}, which is not running")
        if current.preempting:
            return
        job = self.jobs[job_id - 1]
        self.running[job_id] = RunningJob(
            job_id=current.job_id,
            org_id=current.org_id,
            user_id=current.user_id,
            gpu_type=current.gpu_type,
            placements=current.placements,
            started_at=current.started_at,
            time_limit_s=current.time_limit_s,
            priority_class=current.priority_class,
            preemptible=current.preemptible,
            preempting=True,
            preempt_deadline=max(deadline, t),
            checkpoint_interval_s=current.checkpoint_interval_s,
        )
        self._changed[job_id] = self.running[job_id]
        self._running_tuple = None
        self.stats.preemptions_sent += 1
        self._push(max(deadline, t), _KILL, job)

    def _start(
        self, t: float, job_id: int, placements: tuple[Placement, ...], borrowed: bool
    ) -> None:
        job = self.jobs[job_id - 1]
        pending = self.pending.pop(job_id, None)
        if pending is None:
            raise SimulationError(f"core started job {job_id}, which is not pending")
        self._pending_tuple = None
        self._queue(job, -1)
        if sum(len(p.gpus) for p in placements) != job.gpus or len(placements) != pending.nodes:
            raise SimulationError(f"core gave job {job_id} a placement of the wrong shape")
        busy = self.busy
        for placement in placements:
            self.idle.take(placement.node_id, len(placement.gpus))
            for gpu in placement.gpus:
                key = (placement.node_id, gpu)
                if key in busy:
                    raise SimulationError(f"core gave GPU {key} twice (job {job_id})")
                busy.add(key)
        org = job.org_index
        self._advance_usage(org, t)
        node = self.nodes[placements[0].node_id - 1]
        job.placements = placements
        job.borrowed = borrowed
        job.start_s = t
        if job.first_start_s < 0:
            job.first_start_s = t
        job.wait_s += t - job.queued_since_s
        self.running[job_id] = RunningJob(
            job_id=job_id,
            org_id=pending.org_id,
            user_id=pending.user_id,
            gpu_type=node.gpu_type,
            placements=placements,
            started_at=t,
            time_limit_s=pending.time_limit_s,
            priority_class=pending.priority_class,
            preemptible=pending.preemptible,
            checkpoint_interval_s=self.sim.checkpoint_interval_s,
        )
        if self._changed.get(job_id, 0) is not None:  # not one that left since the core looked
            self._fresh.add(job_id)
        self._changed[job_id] = self.running[job_id]
        self._running_tuple = None
        self.allocated += job.gpus
        self.org_alloc[org] += job.gpus
        self.weighted_alloc[org] += job.gpus * self.weight_of[node.gpu_type]
        if borrowed:
            self.org_borrowed[org] += job.gpus
            heapq.heappush(self._protected, (t + self.config.min_runtime_s, job_id))
        self.stats.starts += 1
        self._push(t + min(job.remaining_s, job.time_limit_s), _END, job)
        self._record(t, org)


def _limit(org: Org, gpu_type: str | None, gpu_types: set[str]) -> int | None:
    """The most GPUs `org` may hold for a job of `gpu_type` (any type: None), if bounded."""
    types = {gpu_type} if gpu_type else gpu_types
    if not types or any(t not in org.limit for t in types):
        return None
    return sum(org.limit[t] for t in types)
