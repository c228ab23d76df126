"""Property tests of the core's invariants over random snapshots (hypothesis)."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import Scheduler, schedule
from scheduler.core.capacity import MEMORY_TIERS_MAX, memory_tiers
from scheduler.core.types import (
    Decisions,
    DependencyState,
    Node,
    Org,
    PendingJob,
    Placement,
    PolicyConfig,
    ReasonCode,
    RunningJob,
    Snapshot,
)
from tests.core.golden import digest

TYPES = ("H100", "A100")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    nodes = []
    for i in range(draw(st.integers(1, 8))):
        g = draw(st.sampled_from([8, 8, 4, 2]))
        nodes.append(
            Node(
                id=i + 1,
                name=f"n{i + 1}",
                site=draw(st.sampled_from(["s1", "s1", "s2"])),
                domain=draw(st.sampled_from(["d1", "d2"])),
                gpu_type=draw(st.sampled_from([*TYPES, "H100"])),
                gpus=tuple(range(g)),
                unhealthy_gpus=draw(st.frozensets(st.integers(0, g - 1), max_size=1)),
                schedulable=draw(st.sampled_from([True, True, True, False])),
            )
        )
    orgs: list[Org] = []
    for i in range(draw(st.integers(1, 4))):
        parent = draw(st.sampled_from([None] + [o.id for o in orgs]))
        guaranteed = {t: draw(st.integers(0, 16)) for t in TYPES if draw(st.integers(0, 3)) > 0}
        limit = {t: draw(st.integers(0, 24)) for t in TYPES if draw(st.integers(0, 3)) == 0}
        orgs.append(
            Org(
                id=i + 1,
                name=f"o{i + 1}",
                parent_id=parent,
                shares=draw(st.sampled_from([0.5, 1.0, 2.0])),
                guaranteed=guaranteed,
                limit=limit,
                usage=draw(st.floats(0, 1e6)),
            )
        )
    org_ids = [o.id for o in orgs]
    free = {n.id: [g for g in n.gpus if g not in n.unhealthy_gpus] for n in nodes}
    running = []
    for j in range(draw(st.integers(0, 12))):
        node = draw(st.sampled_from(nodes))
        avail = free[node.id]
        if not avail:
            continue
        k = draw(st.integers(1, len(avail)))
        gpus = tuple(avail[:k])
        del avail[:k]
        preempting = draw(st.integers(0, 5)) == 0
        running.append(
            RunningJob(
                job_id=1000 + j,
                org_id=draw(st.sampled_from(org_ids)),
                user_id=1,
                gpu_type=node.gpu_type,
                placements=(Placement(node.id, gpus),),
                started_at=draw(st.sampled_from([-5000.0, -5000.0, -700.0, -100.0, 0.0])),
                time_limit_s=draw(st.sampled_from([600.0, 3600.0, 7200.0])),
                priority_class=draw(st.sampled_from(["low", "normal", "high"])),
                preemptible=draw(st.integers(0, 2)) > 0,
                preempting=preempting,
                preempt_deadline=20.0 if preempting else None,
            )
        )
    pending = []
    for j in range(draw(st.integers(1, 12))):
        pending.append(
            PendingJob(
                job_id=1 + j,
                org_id=draw(st.sampled_from([*org_ids * 4, 99])),
                user_id=1,
                gpus_per_node=draw(st.sampled_from([1, 1, 2, 2, 4, 8, 9])),
                nodes=draw(st.sampled_from([1, 1, 1, 2, 3])),
                time_limit_s=draw(st.sampled_from([300.0, 3600.0])),
                submitted_at=draw(st.sampled_from([-100.0, -50.0, 0.0])),
                gpu_type=draw(st.sampled_from([None, "H100", "H100", "A100", "A100", "B200"])),
                site=draw(st.sampled_from([None, None, "s1", "s2"])),
                priority_class=draw(st.sampled_from(["low", "normal", "high"])),
                preemptible=draw(st.booleans()),
                held=draw(st.integers(0, 19)) == 0,
                dependency=draw(
                    st.sampled_from([DependencyState.NONE] * 12 + list(DependencyState))
                ),
            )
        )
    config = PolicyConfig(
        ordering=draw(st.sampled_from(["multifactor", "fifo"])),
        backfill=draw(st.booleans()),
        borrowing=draw(st.booleans()),
        preemption=draw(st.booleans()),
        backfill_reservations=draw(st.sampled_from([0, 1, 8])),
    )
    return Snapshot(0.0, tuple(nodes), tuple(orgs), tuple(running), tuple(pending), config)


def subtree_alloc(snap: Snapshot, extra: list[tuple[int, str, int]]) -> dict[tuple[int, str], int]:
    parent = {o.id: o.parent_id for o in snap.orgs}
    out: dict[tuple[int, str], int] = {}
    items = [(r.org_id, r.gpu_type, r.gpu_count) for r in snap.running] + extra
    for org_id, t, n in items:
        seen = set()
        a: int | None = org_id
        while a is not None and a in parent and a not in seen:
            seen.add(a)
            out[(a, t)] = out.get((a, t), 0) + n
            a = parent[a]
    return out


def check_invariants(snap: Snapshot, d: Decisions) -> None:
    nodes = {n.id: n for n in snap.nodes}
    jobs = {j.job_id: j for j in snap.pending}
    held = {(p.node_id, g) for r in snap.running for p in r.placements for g in p.gpus}
    given: set[tuple[int, int]] = set()
    added: list[tuple[int, str, int]] = []
    for s in d.starts:
        job = jobs[s.job_id]
        # Gangs whole: one placement per node asked, each with exactly gpus_per_node GPUs.
        assert len(s.placements) == job.nodes
        assert len({p.node_id for p in s.placements}) == job.nodes
        types = {nodes[p.node_id].gpu_type for p in s.placements}
        sites = {nodes[p.node_id].site for p in s.placements}
        assert len(types) == 1
        assert len(sites) == 1
        if job.gpu_type is not None:
            assert types == {job.gpu_type}
        if job.site is not None:
            assert sites == {job.site}
        for p in s.placements:
            node = nodes[p.node_id]
            assert node.schedulable
            assert len(p.gpus) == job.gpus_per_node == len(set(p.gpus))
            for g in p.gpus:
                # No GPU given twice, nor one that a running job holds, nor an unhealthy one.
                assert (p.node_id, g) not in given
                assert (p.node_id, g) not in held
                assert g in node.gpus
                assert g not in node.unhealthy_gpus
                given.add((p.node_id, g))
        assert not job.held
        assert job.dependency in (DependencyState.NONE, DependencyState.SATISFIED)
        if s.borrowed:
            assert job.preemptible
            assert snap.config.borrowing
        added.append((job.org_id, types.pop(), job.gpu_count))
    # No org (nor ancestor) above its limit because of a start.
    before = subtree_alloc(snap, [])
    after = subtree_alloc(snap, added)
    for o in snap.orgs:
        for t, lim in o.limit.items():
            if after.get((o.id, t), 0) > before.get((o.id, t), 0):
                assert after[(o.id, t)] <= lim
    # Standings report what each org's subtree holds after the starts.
    for o in snap.orgs:
        held_after = {t: n for (oid, t), n in after.items() if oid == o.id and n > 0}
        assert dict(d.standings[o.id].allocated) == held_after
    # Preemptions: only when enabled, only preemptible, old enough, not already being preempted.
    running = {r.job_id: r for r in snap.running}
    if d.preemptions:
        assert snap.config.preemption
    assert len({p.job_id for p in d.preemptions}) == len(d.preemptions)
    for pre in d.preemptions:
        r = running[pre.job_id]
        assert r.preemptible
        assert not r.preempting
        assert snap.now - r.started_at >= snap.config.min_runtime_s
    # Every job still pending is explained; started jobs are not.
    started = {s.job_id for s in d.starts}
    assert set(d.pending) == set(jobs) - started
    for info in d.pending.values():
        assert info.reasons
        if info.estimated_start is not None:
            assert info.estimated_start >= snap.now


@SETTINGS
@given(snapshots())
def test_decisions_keep_the_invariants(snap: Snapshot) -> None:
    check_invariants(snap, schedule(snap))


@SETTINGS
@given(snapshots(), st.randoms(use_true_random=False))
def test_same_snapshot_same_decisions_whatever_the_input_order(
    snap: Snapshot, rnd: random.Random
) -> None:
    first = schedule(snap)
    assert schedule(snap) == first

    def shuffled(items: tuple) -> tuple:  # type: ignore[type-arg]
        out = list(items)
        rnd.shuffle(out)
        return tuple(out)

    permuted = replace(
        snap,
        nodes=shuffled(snap.nodes),
        orgs=shuffled(snap.orgs),
        running=shuffled(snap.running),
        pending=shuffled(snap.pending),
    )
    assert schedule(permuted) == first


def advance(snap: Snapshot, d: Decisions, step_s: float) -> Snapshot:
    """Apply decisions, let time pass; victims leave at their deadline and requeue."""
    by_id = {j.job_id: j for j in snap.pending}
    nodes = {n.id: n for n in snap.nodes}
    now = snap.now + step_s
    preempted = {p.job_id: p.deadline for p in d.preemptions}
    running: list[RunningJob] = []
    requeued: list[PendingJob] = []
    for r in snap.running:
        deadline = preempted.get(r.job_id, r.preempt_deadline if r.preempting else None)
        if deadline is not None and deadline <= now:
            if r.preemptible:
                requeued.append(
                    PendingJob(
                        r.job_id,
                        r.org_id,
                        r.user_id,
                        r.placements[0].gpus.__len__(),
                        len(r.placements),
                        r.time_limit_s,
                        snap.now,
                        r.gpu_type,
                        None,
                        r.priority_class,
                        True,
                    )
                )
            continue
        if r.job_id in preempted:
            r = replace(r, preempting=True, preempt_deadline=preempted[r.job_id])
        running.append(r)
    started = set()
    for s in d.starts:
        j = by_id[s.job_id]
        running.append(
            RunningJob(
                j.job_id,
                j.org_id,
                j.user_id,
                nodes[s.placements[0].node_id].gpu_type,
                s.placements,
                snap.now,
                1e9,
                j.priority_class,
                j.preemptible,
            )
        )
        started.add(j.job_id)
    pending = tuple(j for j in snap.pending if j.job_id not in started) + tuple(requeued)
    return replace(snap, now=now, running=tuple(running), pending=pending)


@SETTINGS
@given(snapshots(), st.sampled_from([40.0, 700.0]))
def test_applying_decisions_converges_without_back_and_forth(snap: Snapshot, step_s: float) -> None:
    preempted: list[int] = []
    s = snap
    quiet = 0
    for _ in range(10):
        d = schedule(s)
        check_invariants(s, d)
        preempted += [p.job_id for p in d.preemptions]
        quiet = quiet + 1 if not d.starts and not d.preemptions else 0
        if quiet >= 2:
            break
        s = advance(s, d, step_s)
    # Nothing ends in this world, so a job preempted once is never preempted again ...
    assert len(preempted) == len(set(preempted)), preempted
    # ... and the cluster settles: two quiet cycles in a row.
    assert quiet >= 2


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 6),
    st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=6),
    st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=6),
)
def test_guarantee_comes_back_within_grace_plus_one_cycle(
    node_count: int, borrower_sizes: list[int], asks: list[int]
) -> None:
    """Org 2 borrows idle GPUs; org 1 asks for (part of) its guarantee: it runs one cycle later."""
    cluster = tuple(
        Node(i + 1, f"n{i + 1}", "s1", "d1", "H100", tuple(range(8))) for i in range(node_count)
    )
    capacity = 8 * node_count
    guarantee = capacity // 2
    # Org 2 fills the cluster with old preemptible jobs, first fit.
    free = {n.id: list(range(8)) for n in cluster}
    running = []
    for i, size in enumerate(borrower_sizes * 8):
        nid = next((n for n in free if len(free[n]) >= size), None)
        if nid is None:
            break
        gpus = tuple(free[nid][:size])
        del free[nid][:size]
        running.append(
            RunningJob(100 + i, 2, 1, "H100", (Placement(nid, gpus),), -1e4, 1e6, preemptible=True)
        )
    # Org 1 asks for jobs that fit in its guarantee together.
    pending = []
    total = 0
    for i, size in enumerate(asks):
        if total + size > guarantee:
            break
        total += size
        pending.append(PendingJob(1 + i, 1, 1, size, 1, 3600.0, 0.0, "H100"))
    orgs = (
        Org(1, "a", guaranteed={"H100": guarantee}),
        Org(2, "b", guaranteed={"H100": capacity - guarantee}),
    )
    snap = Snapshot(0.0, cluster, orgs, tuple(running), tuple(pending))
    d = schedule(snap)
    started = {s.job_id for s in d.starts}
    grace = snap.config.preemption_grace_s
    after = advance(snap, d, grace + 1)
    d2 = schedule(after)
    started |= {s.job_id for s in d2.starts}
    assert {j.job_id for j in pending} <= started
    # Only borrowers lose GPUs; with 1-GPU borrowers, only what they borrowed. (Larger
    # borrowers may have to give a whole job back: a guarantee beats a partial borrower.)
    victims = {p.job_id for p in d.preemptions}
    assert all(r.org_id == 2 for r in running if r.job_id in victims)
    taken = sum(r.gpu_count for r in running if r.job_id in victims)
    held_by_2 = sum(r.gpu_count for r in running)
    if set(borrower_sizes) == {1}:
        assert held_by_2 - taken >= min(held_by_2, capacity - guarantee)


@SETTINGS
@given(snapshots(), st.randoms(use_true_random=False))
def test_isolated_jobs_start_only_on_strict_isolation_nodes(
    snap: Snapshot, rnd: random.Random
) -> None:
    """No job of an org requiring isolation is ever started on (or reserved GPUs freed on) a
    node without strict isolation; a job that can never fit such a node says so."""
    nodes = tuple(replace(n, strict_isolation=rnd.random() < 0.5) for n in snap.nodes)
    isolated = {o.id for o in snap.orgs if rnd.random() < 0.5}
    pending = tuple(replace(j, needs_isolation=j.org_id in isolated) for j in snap.pending)
    snap = replace(snap, nodes=nodes, pending=pending)
    decisions = schedule(snap)
    check_invariants(snap, decisions)
    strict = {n.id for n in nodes if n.strict_isolation}
    needs = {j.job_id for j in pending if j.needs_isolation}
    for start in decisions.starts:
        if start.job_id in needs:
            assert all(p.node_id in strict for p in start.placements), start
    placed = {r.job_id: {p.node_id for p in r.placements} for r in snap.running}
    for pre in decisions.preemptions:
        if pre.preemptor_job_id in needs:  # its victims free GPUs on a strict node
            assert placed[pre.job_id] & strict, pre
    for job_id, info in decisions.pending.items():
        for reason in info.reasons:
            if reason.details.get("isolation") == "strict":
                assert job_id in needs


def _some(rnd: random.Random, names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(f for f in names if rnd.random() < 0.5)


@SETTINGS
@given(snapshots(), st.randoms(use_true_random=False))
def test_jobs_start_only_on_nodes_with_every_feature_they_need(
    snap: Snapshot, rnd: random.Random
) -> None:
    """Agent capabilities and strict isolation at random on nodes and jobs: no job is started on
    (or has GPUs freed on) a node lacking a feature it needs, and every reason naming needed
    capabilities belongs to a job that needs them."""
    caps = ("signal", "pty")
    nodes = tuple(
        replace(n, capabilities=_some(rnd, caps), strict_isolation=rnd.random() < 0.3)
        for n in snap.nodes
    )
    pending = tuple(
        replace(j, capabilities=_some(rnd, caps), needs_isolation=rnd.random() < 0.2)
        for j in snap.pending
    )
    snap = replace(snap, nodes=nodes, pending=pending)
    decisions = schedule(snap)
    check_invariants(snap, decisions)
    features = {n.id: n.features for n in nodes}
    needs = {j.job_id: j.needs for j in pending}
    for start in decisions.starts:
        assert all(needs[start.job_id] <= features[p.node_id] for p in start.placements), start
    placed = {r.job_id: {p.node_id for p in r.placements} for r in snap.running}
    for pre in decisions.preemptions:
        need = needs[pre.preemptor_job_id]
        assert any(need <= features[nid] for nid in placed[pre.job_id]), pre
    for job_id, info in decisions.pending.items():
        for reason in info.reasons:
            named = reason.details.get("capabilities")
            if named:
                assert set(str(named).split(",")) <= needs[job_id]


@SETTINGS
@given(snapshots(), st.randoms(use_true_random=False))
def test_capabilities_every_node_has_decide_as_none(snap: Snapshot, rnd: random.Random) -> None:
    """Every agent able to do everything (the simulator's nodes, a current cluster): jobs that
    need capabilities are decided exactly as jobs that need none."""
    plain = schedule(snap)
    needing = schedule(
        replace(
            snap,
            pending=tuple(
                replace(j, capabilities=_some(rnd, ("signal", "pty"))) for j in snap.pending
            ),
        )
    )
    assert needing.starts == plain.starts
    assert needing.preemptions == plain.preemptions
    assert {k: [r.code for r in v.reasons] for k, v in needing.pending.items()} == {
        k: [r.code for r in v.reasons] for k, v in plain.pending.items()
    }


@SETTINGS
@given(snapshots())
def test_isolation_everywhere_decides_as_isolation_nowhere(snap: Snapshot) -> None:
    """Every node strict and every job needing it: the same starts and preemptions as without
    isolation (the strict-isolation levels then hold every node), so the strict paths of the
    index, reservations and preemption plans place exactly like the ordinary ones."""
    plain = schedule(snap)
    everywhere = replace(
        snap,
        nodes=tuple(replace(n, strict_isolation=True) for n in snap.nodes),
        pending=tuple(replace(j, needs_isolation=True) for j in snap.pending),
    )
    strict = schedule(everywhere)
    assert strict.starts == plain.starts
    assert strict.preemptions == plain.preemptions
    assert {k: v.estimated_start for k, v in strict.pending.items()} == {
        k: v.estimated_start for k, v in plain.pending.items()
    }
    assert {k: [r.code for r in v.reasons] for k, v in strict.pending.items()} == {
        k: [r.code for r in v.reasons] for k, v in plain.pending.items()
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    snapshots(),
    st.lists(
        st.sampled_from(["submit", "end", "time", "same-nodes", "drain", "usage", "org"]),
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_a_kept_scheduler_decides_as_a_fresh_one(
    snap: Snapshot, steps: list[str], rnd: random.Random
) -> None:
    """What a `Scheduler` keeps across cycles never changes a decision: over random sequences
    of submissions, ends, time steps, node changes (equal nodes in a new tuple, a drain) and org
    changes (new usage in new objects; one org's shares, guarantees, limits or parent), its
    decisions are those of a cycle that keeps nothing, explanations and standings included."""
    kept = Scheduler()
    next_id = 10_000
    s = snap
    trees, changed_orgs = 0, True
    for step in [*steps, "time"]:
        d = kept.schedule(s)
        assert digest(d) == digest(schedule(s)), step
        # The org tree is built at the first cycle and after an org's structure changed, only.
        assert kept.trees_built == trees + changed_orgs, step
        trees, changed_orgs = kept.trees_built, step == "org"
        s = advance(s, d, 30.0 if step != "time" else rnd.choice([1.0, 700.0, 1e5]))
        if step == "submit":
            extra = []
            for _ in range(rnd.randint(1, 4)):
                next_id += 1
                template = rnd.choice(snap.pending)
                extra.append(replace(template, job_id=next_id, submitted_at=s.now))
            s = replace(s, pending=s.pending + tuple(extra))
        elif step == "end" and s.running:
            gone = set(rnd.sample([r.job_id for r in s.running], rnd.randint(1, len(s.running))))
            s = replace(s, running=tuple(r for r in s.running if r.job_id not in gone))
        elif step == "same-nodes":
            s = replace(s, nodes=tuple(replace(n) for n in s.nodes))
        elif step == "drain":
            victim = rnd.choice(s.nodes).id
            s = replace(s, nodes=tuple(replace(n, schedulable=n.id != victim) for n in s.nodes))
        elif step == "usage":
            s = replace(
                s, orgs=tuple(replace(o, usage=rnd.choice([0.0, 1e3, 1e6])) for o in s.orgs)
            )
        elif step == "org":
            o = rnd.choice(s.orgs)
            others = [x.id for x in s.orgs if x.id != o.id]
            changed = rnd.choice(
                [
                    replace(o, shares=o.shares + rnd.choice([0.5, 3.0])),
                    replace(
                        o, guaranteed={t: g + 8 for t, g in o.guaranteed.items()} or {"H100": 8}
                    ),
                    replace(o, limit={**o.limit, "A100": o.limit.get("A100", 0) + 9}),
                    replace(
                        o, parent_id=None if o.parent_id is not None else rnd.choice(others or [0])
                    ),
                ]
            )
            s = replace(s, orgs=tuple(changed if x is o else x for x in s.orgs))


_SHARES = (None, 16 * 2**30, 80 * 2**30, 80 * 2**30, 200 * 2**30)


@SETTINGS
@given(snapshots(), st.randoms(use_true_random=False))
def test_jobs_start_only_on_nodes_their_memory_fits(snap: Snapshot, rnd: random.Random) -> None:
    """Memory shares at random on nodes (some unreported) and `--mem` at random on jobs, with
    capabilities beside them: no job starts on (or has GPUs freed on) a node that reported a
    share its memory per node does not fit in, and a job told no node could ever hold its
    memory could indeed start on none."""
    caps = ("signal", "pty")
    nodes = tuple(
        replace(n, memory_per_gpu_bytes=rnd.choice(_SHARES), capabilities=_some(rnd, caps))
        for n in snap.nodes
    )
    pending = tuple(
        replace(
            j,
            memory_bytes=rnd.choice((None, 2**30, 100 * 2**30, 900 * 2**30, 4000 * 2**30)),
            capabilities=_some(rnd, caps) if rnd.random() < 0.3 else frozenset(),
        )
        for j in snap.pending
    )
    snap = replace(snap, nodes=nodes, pending=pending)
    decisions = schedule(snap)
    check_invariants(snap, decisions)
    by_id = {n.id: n for n in nodes}
    jobs = {j.job_id: j for j in pending}

    def fits(j: PendingJob, nid: int) -> bool:
        share = by_id[nid].memory_per_gpu_bytes
        mem = j.memory_bytes
        return share is None or mem is None or share * j.gpus_per_node >= mem

    for start in decisions.starts:
        j = jobs[start.job_id]
        assert all(fits(j, p.node_id) and len(p.gpus) == j.gpus_per_node for p in start.placements)
    placed = {r.job_id: {p.node_id for p in r.placements} for r in snap.running}
    for pre in decisions.preemptions:
        assert any(fits(jobs[pre.preemptor_job_id], nid) for nid in placed[pre.job_id]), pre
    for job_id, info in decisions.pending.items():
        for reason in info.reasons:
            if "largest_memory_per_gpu_bytes" in reason.details and (
                reason.code == ReasonCode.BAD_CONSTRAINTS
            ):
                assert not any(fits(jobs[job_id], n.id) for n in nodes)


@SETTINGS
@given(snapshots(), st.randoms(use_true_random=False))
def test_memory_every_node_holds_decides_as_none(snap: Snapshot, rnd: random.Random) -> None:
    """Nodes that report no share, or shares every job's memory fits in: jobs with `--mem`
    are decided exactly as jobs without (their memory selects every node: class 0)."""
    plain = schedule(snap)
    reported = rnd.random() < 0.5
    nodes = tuple(
        replace(n, memory_per_gpu_bytes=rnd.choice((None, 2**40)) if reported else None)
        for n in snap.nodes
    )
    pending = tuple(
        replace(j, memory_bytes=rnd.choice((None, 2**30, 2**40 * j.gpus_per_node)))
        for j in snap.pending
    )
    asking = schedule(replace(snap, nodes=nodes, pending=pending))
    assert asking.starts == plain.starts
    assert asking.preemptions == plain.preemptions
    assert {k: [r.code for r in v.reasons] for k, v in asking.pending.items()} == {
        k: [r.code for r in v.reasons] for k, v in plain.pending.items()
    }


@SETTINGS
@given(st.lists(st.integers(1, 2**45), min_size=1, max_size=200))
def test_memory_tiers_are_few_shares_holding_the_lowest_and_largest(shares: list[int]) -> None:
    """A node counts as having the largest tier at most its share: tiers taken from the shares
    keep every placement within a node's real share, and the largest kept makes "no node could
    ever hold it" exact; at most MEMORY_TIERS_MAX + 1 of them bound the layout's classes."""
    tiers = memory_tiers(shares)
    assert tiers == sorted(set(tiers))
    assert set(tiers) <= set(shares)
    assert (tiers[0], tiers[-1]) == (min(shares), max(shares))
    assert len(tiers) <= MEMORY_TIERS_MAX + 1
