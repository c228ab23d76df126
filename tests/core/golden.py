"""Seeded snapshots whose decisions were recorded before the core was optimised.

`python -m tests.core.golden` prints the digests of the current code's decisions as JSON; the
recorded ones (`golden_decisions.json`, from commit 9648a50, before any speed work) are what
`test_golden.py` compares with, so that a faster core provably decides exactly the same.
Chains run several cycles on one `nodes` tuple object, as the simulator and the server do, so
that anything cached across calls is exercised too.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import replace

from scheduler.bench.core import Size, applied, build
from scheduler.core import Scheduler, schedule
from scheduler.core.types import (
    Decisions,
    DependencyState,
    Node,
    Org,
    PendingJob,
    Placement,
    PolicyConfig,
    RunningJob,
    Snapshot,
)

TYPES = ("H100", "A100")
CONFIGS = {
    "fairgpu": PolicyConfig(),
    "slurm-like": PolicyConfig(borrowing=False, preemption=False),
    "fifo": PolicyConfig(ordering="fifo", backfill=False, borrowing=False, preemption=False),
    "fast": PolicyConfig(explain=False),
    "fairtree": PolicyConfig(fairshare_algorithm="fairtree", backfill_reservations=1),
}


def random_snapshot(seed: int, config: PolicyConfig) -> Snapshot:
    """A small, varied cluster: drained and broken nodes, a tree, leaving jobs, odd requests."""
    rng = random.Random(seed)
    nodes = []
    for i in range(rng.randint(2, 40)):
        g = rng.choice([8, 8, 8, 4, 2])
        nodes.append(
            Node(
                id=i + 1,
                name=f"n{i + 1}",
                site=rng.choice(["s1", "s1", "s2", "s3"]),
                domain=rng.choice(["d1", "d2", "d3"]),
                gpu_type=rng.choice([*TYPES, "H100"]),
                gpus=tuple(range(g)),
                unhealthy_gpus=frozenset({rng.randrange(g)}) if rng.random() < 0.1 else frozenset(),
                schedulable=rng.random() > 0.1,
            )
        )
    orgs: list[Org] = []
    for i in range(rng.randint(1, 9)):
        parent = rng.choice([None, None] + [o.id for o in orgs])
        guaranteed = {t: rng.randint(0, 40) for t in TYPES if rng.random() < 0.75}
        limit = {t: rng.randint(0, 80) for t in TYPES if rng.random() < 0.25}
        orgs.append(
            Org(
                id=i + 1,
                name=f"o{i + 1}",
                parent_id=parent,
                shares=rng.choice([0.5, 1.0, 2.0, 3.0]),
                guaranteed=guaranteed,
                limit=limit,
                usage=rng.random() * 1e6,
            )
        )
    org_ids = [o.id for o in orgs]
    free = {n.id: [g for g in n.gpus if g not in n.unhealthy_gpus] for n in nodes}
    running = []
    for j in range(rng.randint(0, 60)):
        width = rng.choice([1, 1, 1, 2])
        picks = rng.sample(nodes, min(width, len(nodes)))
        want = rng.choice([1, 1, 2, 4, 8])
        if any(len(free[n.id]) < want for n in picks) or len({n.gpu_type for n in picks}) > 1:
            continue
        placements = []
        for n in picks:
            placements.append(Placement(n.id, tuple(free[n.id][:want])))
            del free[n.id][:want]
        preempting = rng.random() < 0.1
        running.append(
            RunningJob(
                job_id=10_000 + j,
                org_id=rng.choice(org_ids),
                user_id=1,
                gpu_type=picks[0].gpu_type,
                placements=tuple(placements),
                started_at=rng.choice([-50_000.0, -5000.0, -700.0, -100.0, 0.0]),
                time_limit_s=rng.choice([600.0, 3600.0, 7200.0, 86_400.0]),
                priority_class=rng.choice(["low", "normal", "normal", "high"]),
                preemptible=rng.random() < 0.6,
                preempting=preempting,
                preempt_deadline=rng.choice([20.0, 5.0]) if preempting else None,
            )
        )
    pending = []
    for j in range(rng.randint(1, 120)):
        pending.append(
            PendingJob(
                job_id=1 + j,
                org_id=rng.choice([*org_ids * 6, 99]),
                user_id=1,
                gpus_per_node=rng.choice([1, 1, 1, 2, 2, 4, 8, 8, 9]),
                nodes=rng.choice([1, 1, 1, 1, 2, 3, 5]),
                time_limit_s=rng.choice([300.0, 3600.0, 3600.0, 36_000.0, 0.0 if j == 7 else 60.0]),
                submitted_at=rng.choice([-90_000.0, -100.0, -50.0, 0.0]),
                gpu_type=rng.choice([None, "H100", "H100", "A100", "A100", "B200"]),
                site=rng.choice([None, None, None, "s1", "s2", "s9"]),
                priority_class=rng.choice(["low", "normal", "normal", "high", "odd"]),
                preemptible=rng.random() < 0.5,
                held=rng.random() < 0.04,
                dependency=rng.choice([DependencyState.NONE] * 12 + list(DependencyState)),
            )
        )
    return Snapshot(0.0, tuple(nodes), tuple(orgs), tuple(running), tuple(pending), config)


def digest(d: Decisions) -> str:
    """Everything the core decided, in a canonical text form, hashed."""
    parts = [
        repr(d.starts),
        repr(d.preemptions),
        repr(sorted(d.pending.items())),
        repr(sorted(d.standings.items())),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cases() -> Iterator[tuple[str, list[Snapshot]]]:
    """Named runs: each is a list of snapshots (a chain feeds each cycle's result to the next)."""
    for seed in range(40):
        name = list(CONFIGS)[seed % len(CONFIGS)]
        yield f"random-{seed}-{name}", [random_snapshot(seed, CONFIGS[name])]
    for seed in range(3):
        for name, cfg in CONFIGS.items():
            snap = replace(build(Size("g", 48, 400, 200, 12), seed=100 + seed), config=cfg)
            yield f"bench-{seed}-{name}", [snap]


def chain_decisions(
    snap: Snapshot, cycles: int, by_class: bool | None = None
) -> Iterator[Decisions]:
    """Cycles of one `Scheduler` on one `nodes` tuple object, each on the state the previous one
    left (the layout is reused until a node drains)."""
    scheduler = Scheduler(by_class=by_class)
    for i in range(cycles):
        d = scheduler.schedule(snap)
        yield d
        snap = applied(snap, d, 60.0)
        if i == cycles // 2:  # a node drains: a new `nodes` tuple, whatever was cached
            first = snap.nodes[0].id
            nodes = tuple(replace(n, schedulable=n.id != first) for n in snap.nodes)
            snap = replace(snap, nodes=nodes)


def record(by_class: bool | None = None) -> dict[str, list[str]]:
    """The digests; `by_class` True or False: every cycle in a `Scheduler` that takes the
    pending queue class by class, or job by job (`Scheduler`'s `by_class`)."""
    out: dict[str, list[str]] = {}
    for name, snaps in cases():
        if by_class is None:
            out[name] = [digest(schedule(s)) for s in snaps]
        else:
            out[name] = [digest(Scheduler(by_class=by_class).schedule(s)) for s in snaps]
    for seed in range(4):
        cfg = list(CONFIGS.values())[seed % len(CONFIGS)]
        snap = replace(build(Size("c", 64, 600, 300, 16), seed=200 + seed), config=cfg)
        out[f"chain-{seed}"] = [digest(d) for d in chain_decisions(snap, 6, by_class)]
    return out


if __name__ == "__main__":
    print(json.dumps(record(), indent=1, sort_keys=True))
