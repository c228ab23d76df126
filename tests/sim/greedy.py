"""A tiny first-fit scheduler used as a test double, so engine tests do not depend on policy."""

from __future__ import annotations

from scheduler.core.types import Decisions, Placement, Snapshot, Start


def greedy(snapshot: Snapshot) -> Decisions:
    """Submit order, first fit, every org capped at its guarantee unless borrowing is on."""
    free: dict[int, list[int]] = {n.id: list(n.gpus) for n in snapshot.nodes}
    held: dict[int, int] = {}
    for run in snapshot.running:
        held[run.org_id] = held.get(run.org_id, 0) + run.gpu_count
        for p in run.placements:
            for gpu in p.gpus:
                free[p.node_id].remove(gpu)
    limits = {o.id: sum(o.guaranteed.values()) for o in snapshot.orgs}
    starts = []
    for job in sorted(snapshot.pending, key=lambda j: (j.submitted_at, j.job_id)):
        borrowed = held.get(job.org_id, 0) + job.gpu_count > limits[job.org_id]
        if borrowed and not snapshot.config.borrowing:
            continue
        chosen = []
        for node_id, gpus in free.items():
            if len(gpus) >= job.gpus_per_node:
                chosen.append(node_id)
                if len(chosen) == job.nodes:
                    break
        if len(chosen) < job.nodes:
            if snapshot.config.ordering == "fifo":
                break
            continue
        placements = []
        for node_id in chosen:
            take, free[node_id] = (
                free[node_id][: job.gpus_per_node],
                free[node_id][job.gpus_per_node :],
            )
            placements.append(Placement(node_id, tuple(take)))
        held[job.org_id] = held.get(job.org_id, 0) + job.gpu_count
        starts.append(Start(job.job_id, tuple(placements), borrowed))
    return Decisions(starts=tuple(starts))
