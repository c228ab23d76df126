"""Synthetic cluster snapshots and cycle timings for `fairgpu bench core`.

Snapshots are generated from a seeded `random.Random`, so every run times the same work. The
cluster is realistic in shape: two GPU types, four sites, 32-node topology domains, a three-level
org tree with guarantees and limits, a mostly full cluster (the expensive case for backfill and
preemption) and a deep queue of mixed gangs, held jobs, dependencies and impossible requests.
"""

from __future__ import annotations

import gc
import random
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from scheduler.core.scheduler import Scheduler
from scheduler.core.types import (
    Decisions,
    DependencyState,
    Node,
    Org,
    PendingJob,
    Placement,
    RunningJob,
    Snapshot,
)
from scheduler.sim.config import POLICIES

HOUR_S = 3600.0
NOW = 1_800_000_000.0


@dataclass(frozen=True, slots=True)
class Size:
    name: str
    nodes: int
    pending: int
    running: int
    orgs: int
    hetero: bool = False  # nodes of 1, 2, 4 and 8 GPUs of seven types instead of 8 GPUs of two


SIZES = {
    s.name: s
    for s in (
        Size("tiny", 32, 200, 100, 10),
        Size("small", 256, 3_000, 1_500, 50),
        Size("medium", 1_024, 12_500, 5_000, 250),
        Size("large", 4_096, 50_000, 20_000, 1_000),
        # Scaling checks: many nodes with a short queue, few nodes with a deep queue.
        Size("wide", 4_096, 5_000, 20_000, 1_000),
        Size("deep", 512, 50_000, 2_500, 1_000),
        # A heterogeneous fleet: seven GPU types on nodes of 1, 2, 4 and 8 GPUs.
        Size("hetero", 1_200, 20_000, 5_000, 200, hetero=True),
    )
}
HETERO_TYPES = ("H200", "H100", "A100", "L40S", "A10", "V100", "T4")
QUICK = ("tiny", "small")
DEFAULT = ("tiny", "small", "medium", "wide", "deep", "hetero", "large")


def _orgs(rng: random.Random, count: int, capacity: dict[str, int]) -> list[Org]:
    top = max(1, count // 100)
    mid = min(max(0, count - top), top * 9)
    leaves = max(0, count - top - mid)
    out: list[Org] = []
    next_id = 1
    tops: list[int] = []
    for _ in range(top):
        guar = {t: int(c * 0.8 / top) for t, c in capacity.items()}
        lim = {t: int(c * 0.6) for t, c in capacity.items()} if top > 2 else {}
        out.append(
            Org(
                next_id,
                f"prog{next_id}",
                None,
                rng.choice([1, 2, 4]),
                guar,
                lim,
                rng.random() * 1e8,
            )
        )
        tops.append(next_id)
        next_id += 1
    mids: list[int] = []
    for i in range(mid):
        parent = tops[i % top]
        per = max(1, mid // top)
        guar = {t: int(c * 0.8 / top / per) for t, c in capacity.items()}
        out.append(
            Org(
                next_id, f"co{next_id}", parent, rng.choice([1, 2, 3]), guar, {}, rng.random() * 1e7
            )
        )
        mids.append(next_id)
        next_id += 1
    parents = mids or tops
    for i in range(leaves):
        parent = parents[i % len(parents)]
        per = max(1, leaves // len(parents))
        has = rng.random() < 0.7
        guar = {t: int(c * 0.8 / top / max(1, mid // top) / per) for t, c in capacity.items()}
        out.append(
            Org(next_id, f"team{next_id}", parent, 1.0, guar if has else {}, {}, rng.random() * 1e6)
        )
        next_id += 1
    return out


def _shape(rng: random.Random) -> tuple[int, int]:
    x = rng.random()
    if x < 0.6:
        return 1, 1
    if x < 0.75:
        return 2, 1
    if x < 0.85:
        return 4, 1
    if x < 0.95:
        return 8, 1
    return 8, rng.choice([2, 4, 8])


def build(size: Size, seed: int = 1) -> Snapshot:
    """A synthetic snapshot of the given size (deterministic for a seed)."""
    rng = random.Random(seed)
    sites = [f"site{i}" for i in range(4)]
    nodes: list[Node] = []
    for i in range(size.nodes):
        node_type = "H100" if i % 10 < 7 else "A100"
        width = 8
        if size.hetero:
            node_type = HETERO_TYPES[rng.randrange(len(HETERO_TYPES))]
            width = rng.choice((1, 2, 4, 8))
        site = sites[i % len(sites)]
        unhealthy = frozenset({rng.randrange(width)}) if rng.random() < 0.01 else frozenset()
        nodes.append(
            Node(
                i + 1,
                f"n{i + 1}",
                site,
                f"{site}-d{i // 128}",
                node_type,
                tuple(range(width)),
                unhealthy,
                rng.random() > 0.01,
            )
        )
    types = HETERO_TYPES if size.hetero else ("H100", "A100")
    capacity: dict[str, int] = {}
    for n in nodes:
        capacity[n.gpu_type] = capacity.get(n.gpu_type, 0) + len(n.gpus)
    orgs = _orgs(rng, size.orgs, capacity)
    leaf_ids = [o.id for o in orgs[-max(1, size.orgs * 9 // 10) :]]
    # Fill the cluster to about 97 % with `running` jobs, first fit node by node.
    free = {n.id: [g for g in n.gpus if g not in n.unhealthy_gpus] for n in nodes}
    by_type: dict[str, list[int]] = {}
    for n in nodes:
        by_type.setdefault(n.gpu_type, []).append(n.id)
    total = sum(len(v) for v in free.values())
    budget = int(total * 0.97)
    running: list[RunningJob] = []
    job_id = 1
    cursor = dict.fromkeys(by_type, 0)
    attempts = 0
    while len(running) < size.running and budget > 0 and attempts < size.running * 4:
        attempts += 1
        # Running jobs are mostly small: what fills a busy cluster 20,000 jobs deep.
        gpn, k = _shape(rng) if rng.random() < 0.15 else (1, 1)
        t = rng.choice(types) if size.hetero else ("H100" if rng.random() < 0.7 else "A100")
        ids = by_type.get(t, [])
        # First fit from a moving cursor: at most 64 nodes looked at per job.
        found: list[int] = []
        i = cursor[t]
        while i < len(ids) and i < cursor[t] + 64 and len(found) < k:
            if len(free[ids[i]]) >= gpn:
                found.append(ids[i])
            i += 1
        while cursor[t] < len(ids) and len(free[ids[cursor[t]]]) == 0:
            cursor[t] += 1
        if len(found) < k:
            continue
        placed = []
        for nid in found:
            placed.append(Placement(nid, tuple(free[nid][:gpn])))
            del free[nid][:gpn]
        limit_s = rng.choice([1, 4, 12, 24, 48]) * HOUR_S
        started = NOW - rng.random() * limit_s
        preempting = rng.random() < 0.005
        running.append(
            RunningJob(
                job_id,
                rng.choice(leaf_ids),
                1,
                t,
                tuple(placed),
                started,
                limit_s,
                rng.choice(["low", "normal", "normal", "high"]),
                rng.random() < 0.3,
                preempting,
                NOW + 20.0 if preempting else None,
            )
        )
        budget -= gpn * k
        job_id += 1
    pending: list[PendingJob] = []
    for _ in range(size.pending):
        gpn, k = _shape(rng)
        x = rng.random()
        dep = DependencyState.NONE
        if x < 0.02:
            dep = DependencyState.WAITING
        elif x < 0.025:
            dep = DependencyState.NEVER
        gpu_type: str | None = "H100" if rng.random() < 0.65 else "A100"
        if size.hetero:
            gpu_type = rng.choice(types)
        if rng.random() < 0.1:
            gpu_type = None
        if rng.random() < 0.002:
            gpu_type, gpn = "B200", 8  # absent type: BadConstraints
        pending.append(
            PendingJob(
                job_id,
                rng.choice(leaf_ids),
                1,
                gpn,
                k,
                rng.choice([1, 2, 4, 12, 24]) * HOUR_S,
                NOW - rng.random() * 3 * 86_400.0,
                gpu_type,
                rng.choice(sites) if rng.random() < 0.1 else None,
                rng.choice(["low", "normal", "normal", "high"]),
                rng.random() < 0.4,
                rng.random() < 0.01,
                dep,
            )
        )
        job_id += 1
    return Snapshot(NOW, tuple(nodes), tuple(orgs), tuple(running), tuple(pending))


def applied(snap: Snapshot, d: Decisions, later_s: float) -> Snapshot:
    """The next cycle's snapshot: starts run, victims are being preempted, time moved on."""
    pending = {j.job_id: j for j in snap.pending}
    deadline = {p.job_id: p.deadline for p in d.preemptions}
    running = [
        replace(r, preempting=True, preempt_deadline=deadline[r.job_id])
        if r.job_id in deadline
        else r
        for r in snap.running
    ]
    for st in d.starts:
        j = pending.pop(st.job_id)
        t = j.gpu_type or next(n.gpu_type for n in snap.nodes if n.id == st.placements[0].node_id)
        running.append(
            RunningJob(
                j.job_id,
                j.org_id,
                j.user_id,
                t,
                st.placements,
                snap.now,
                j.time_limit_s,
                j.priority_class,
                j.preemptible,
            )
        )
    return replace(
        snap, now=snap.now + later_s, running=tuple(running), pending=tuple(pending.values())
    )


def _time(snap: Snapshot, repeats: int) -> tuple[list[float], list[float], list[float], Decisions]:
    """Wall and CPU ms of each cycle including its explanations, and wall ms of the decisions
    alone; the garbage collector is paused around the cycles, as the simulator does."""
    wall: list[float] = []
    cpu: list[float] = []
    decide: list[float] = []
    decisions = Decisions()
    scheduler = Scheduler()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            c0 = time.process_time()
            t0 = time.perf_counter()
            decisions = scheduler.schedule(snap)
            t1 = time.perf_counter()
            len(decisions.pending)  # the explanations a server writes
            wall.append((time.perf_counter() - t0) * 1000.0)
            decide.append((t1 - t0) * 1000.0)
            cpu.append((time.process_time() - c0) * 1000.0)
    finally:
        if was_enabled:
            gc.enable()
    wall.sort()
    return wall, cpu, decide, decisions


def measure(size: Size, repeats: int, seed: int = 1, policy: str = "fairgpu") -> dict[str, object]:
    """Time the first cycle on a fresh snapshot (a burst) and the cycle after it (steady)."""
    snap = replace(build(size, seed), config=POLICIES[policy])
    times_ms, cpu_ms, decide_ms, decisions = _time(snap, repeats)
    steady_ms, _, _, _ = _time(applied(snap, decisions, 30.0), max(1, repeats // 2))
    p95 = times_ms[min(len(times_ms) - 1, round(0.95 * (len(times_ms) - 1)))]
    return {
        "size": size.name,
        "policy": policy,
        "nodes": len(snap.nodes),
        "gpus": sum(len(n.gpus) for n in snap.nodes),
        "pending": len(snap.pending),
        "running": len(snap.running),
        "running_gpus": sum(r.gpu_count for r in snap.running),
        "orgs": len(snap.orgs),
        "repeats": repeats,
        "cycle_ms_p50": round(statistics.median(times_ms), 1),
        "cycle_ms_p95": round(p95, 1),
        "cycle_ms_min": round(times_ms[0], 1),
        # CPU time of this process: what the cycle costs when other work shares the cores.
        "cpu_ms_p50": round(statistics.median(cpu_ms), 1),
        # The decisions alone, before any explanation is read (what the simulator pays).
        "decide_ms_p50": round(statistics.median(decide_ms), 1),
        # The next cycle, on the state the first one produced 30 s later.
        "steady_cycle_ms_p50": round(statistics.median(steady_ms), 1),
        "starts": len(decisions.starts),
        "preemptions": len(decisions.preemptions),
        "explained": len(decisions.pending),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }


def run(
    names: tuple[str, ...], repeats: int | None = None, policy: str = "fairgpu"
) -> Iterator[dict[str, object]]:
    """Measure each named size; big sizes get fewer repeats unless told otherwise."""
    baseline = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    for name in names:
        size = SIZES[name]
        reps = repeats if repeats is not None else (20 if size.pending <= 5_000 else 7)
        row = measure(size, reps, policy=policy)
        row["rss_before_mb"] = baseline  # the interpreter and imports, before any snapshot
        yield row
