"""A small snapshot builder so that scenario tests read like the scenario."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from scheduler.core.types import (
    Decisions,
    Node,
    Org,
    PendingJob,
    Placement,
    PolicyConfig,
    RunningJob,
    Snapshot,
)

H100 = "H100"


def nodes(
    count: int,
    *,
    gpus: int = 8,
    gpu_type: str = H100,
    site: str = "s1",
    per_domain: int = 16,
    first_id: int = 1,
) -> tuple[Node, ...]:
    return tuple(
        Node(
            id=first_id + i,
            name=f"{site}-n{first_id + i}",
            site=site,
            domain=f"{site}-d{i // per_domain}",
            gpu_type=gpu_type,
            gpus=tuple(range(gpus)),
        )
        for i in range(count)
    )


def org(
    org_id: int,
    *,
    shares: float = 1.0,
    guaranteed: int | Mapping[str, int] = 0,
    limit: int | Mapping[str, int] | None = None,
    parent: int | None = None,
    usage: float = 0.0,
) -> Org:
    g = {H100: guaranteed} if isinstance(guaranteed, int) else dict(guaranteed)
    lim: dict[str, int] = {}
    if isinstance(limit, int):
        lim = {H100: limit}
    elif limit is not None:
        lim = dict(limit)
    return Org(org_id, f"org{org_id}", parent, shares, g, lim, usage)


def job(
    job_id: int,
    org_id: int,
    gpus: int = 1,
    *,
    nodes: int = 1,
    limit_s: float = 3600.0,
    at: float = 0.0,
    gpu_type: str | None = H100,
    **kw: object,
) -> PendingJob:
    return PendingJob(
        job_id=job_id,
        org_id=org_id,
        user_id=1,
        gpus_per_node=gpus,
        nodes=nodes,
        time_limit_s=limit_s,
        submitted_at=at,
        gpu_type=gpu_type,
        **kw,  # type: ignore[arg-type]
    )


def run(
    job_id: int,
    org_id: int,
    on: Iterable[tuple[int, Iterable[int]]],
    *,
    started: float = 0.0,
    limit_s: float = 3600.0,
    gpu_type: str = H100,
    **kw: object,
) -> RunningJob:
    return RunningJob(
        job_id=job_id,
        org_id=org_id,
        user_id=1,
        gpu_type=gpu_type,
        placements=tuple(Placement(n, tuple(g)) for n, g in on),
        started_at=started,
        time_limit_s=limit_s,
        **kw,  # type: ignore[arg-type]
    )


def snapshot(
    *,
    nodes: Iterable[Node],
    orgs: Iterable[Org],
    running: Iterable[RunningJob] = (),
    pending: Iterable[PendingJob] = (),
    now: float = 0.0,
    **config: object,
) -> Snapshot:
    return Snapshot(
        now=now,
        nodes=tuple(nodes),
        orgs=tuple(orgs),
        running=tuple(running),
        pending=tuple(pending),
        config=PolicyConfig(**config),  # type: ignore[arg-type]
    )


def apply(
    snap: Snapshot, d: Decisions, *, now: float | None = None, drop: Iterable[int] = ()
) -> Snapshot:
    """The snapshot after the decisions took effect (starts run; preemptions are being sent)."""
    by_id = {j.job_id: j for j in snap.pending}
    gone = set(drop)
    preempting = {p.job_id: p.deadline for p in d.preemptions}
    running = []
    for r in snap.running:
        if r.job_id in gone:
            continue
        if r.job_id in preempting:
            r = replace(r, preempting=True, preempt_deadline=preempting[r.job_id])
        running.append(r)
    started = set()
    nodes_by_id = {n.id: n for n in snap.nodes}
    for s in d.starts:
        j = by_id[s.job_id]
        t = j.gpu_type or nodes_by_id[s.placements[0].node_id].gpu_type
        running.append(
            RunningJob(
                job_id=j.job_id,
                org_id=j.org_id,
                user_id=j.user_id,
                gpu_type=t,
                placements=s.placements,
                started_at=snap.now,
                time_limit_s=j.time_limit_s,
                priority_class=j.priority_class,
                preemptible=j.preemptible,
            )
        )
        started.add(s.job_id)
    pending = tuple(j for j in snap.pending if j.job_id not in started)
    return replace(
        snap,
        now=snap.now if now is None else now,
        running=tuple(running),
        pending=pending,
    )
