"""What happened, as a simulation result: the `recorded` column beside the simulated policies.

The recorded attempts are swept in time order with the same bookkeeping as the simulator
(held, demanded and borrowed GPUs per org, in-quota waits), so `summarize` computes every figure
of the real history exactly as it does for a simulated run.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.sim.history import History, kept_s
from scheduler.sim.records import RunStats, SimJob, SimResult
from scheduler.sim.timeline import Timeline
from scheduler.sim.trace import TraceJob

RECORDED = "recorded"
_END, _ARRIVE, _START = 0, 1, 2  # at one instant: GPUs freed before they are taken again


def recorded_result(
    history: History, trace: Sequence[TraceJob], total_gpus: int, checkpoint_interval_s: float
) -> SimResult:
    """`trace` is `to_trace(history)`: the same jobs, so both columns describe the same work."""
    t0 = history.start_s
    orgs = history.orgs
    index = {o.name: i for i, o in enumerate(orgs)}
    guaranteed = [sum(o.guaranteed.values()) for o in orgs]
    events: list[tuple[float, int, int, int]] = []  # (t, kind, job, attempt)
    jobs: list[SimJob] = []
    for i, (job, row) in enumerate(zip(history.jobs, trace, strict=True)):
        sim = SimJob(i + 1, row, index[job.org], job.gpus, None, 0.0, row.time_limit_s or 0.0)
        jobs.append(sim)
        events.append((job.submitted_s - t0, _ARRIVE, i, 0))
        for k, attempt in enumerate(job.attempts):
            events.append((attempt.start_s - t0, _START, i, k))
            events.append((attempt.end_s - t0, _END, i, k))
    events.sort()
    timeline = Timeline(len(orgs))
    alloc, demand, borrowed = [0] * len(orgs), [0] * len(orgs), [0] * len(orgs)
    pending_sizes: list[dict[int, int]] = [{} for _ in orgs]
    starved_since: list[float | None] = [None] * len(orgs)
    starved_max, starved_total = [0.0] * len(orgs), [0.0] * len(orgs)
    allocated = waiting = 0
    for t, kind, i, k in events:
        job, sim = history.jobs[i], jobs[i]
        org, sizes = sim.org_index, pending_sizes[sim.org_index]
        attempt = job.attempts[k]
        if kind == _ARRIVE or (kind == _END and k < len(job.attempts) - 1):
            sizes[sim.gpus] = sizes.get(sim.gpus, 0) + 1
            waiting += 1
            sim.queued_since_s = t
            if kind == _ARRIVE:
                demand[org] += sim.gpus
        if kind == _START:
            sizes[sim.gpus] -= 1
            if not sizes[sim.gpus]:
                del sizes[sim.gpus]
            waiting -= 1
            sim.wait_s += t - sim.queued_since_s
            sim.start_s = t
            if sim.first_start_s < 0:
                sim.first_start_s = t
            allocated += sim.gpus
            alloc[org] += sim.gpus
            borrowed[org] += sim.gpus if attempt.borrowed else 0
            sim.borrowed = attempt.borrowed
        elif kind == _END:
            ran_s = t - sim.start_s
            sim.run_s += ran_s
            allocated -= sim.gpus
            alloc[org] -= sim.gpus
            borrowed[org] -= sim.gpus if attempt.borrowed else 0
            if k < len(job.attempts) - 1:  # requeued: the work since its last checkpoint is lost
                sim.preemptions += 1
                sim.lost_gpu_s += (ran_s - kept_s(ran_s, checkpoint_interval_s)) * sim.gpus
            else:
                demand[org] -= sim.gpus
                sim.end_s = t
                sim.outcome = "TIMEOUT" if job.state == "TIMEOUT" else "COMPLETED"
        starved = bool(sizes) and alloc[org] + min(sizes) <= guaranteed[org]
        since = starved_since[org]
        if starved and since is None:
            starved_since[org] = t
        elif not starved and since is not None:
            starved_since[org] = None
            starved_max[org] = max(starved_max[org], t - since)
            starved_total[org] += t - since
        timeline.org_changed(t, org, alloc[org], demand[org], borrowed[org])
        timeline.cluster_changed(t, allocated, waiting > 0)
    horizon = max((j.end_s for j in jobs), default=0.0)
    for org, since in enumerate(starved_since):
        if since is not None:  # still waiting in quota at the end of the window
            starved_max[org] = max(starved_max[org], horizon - since)
            starved_total[org] += horizon - since
    stats = RunStats(end_s=horizon, starved_max_s=starved_max, starved_total_s=starved_total)
    stats.starts = sum(len(j.attempts) for j in history.jobs)
    return SimResult(RECORDED, jobs, timeline, orgs, total_gpus, stats)
