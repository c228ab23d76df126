"""The pending queue taken class by class, kept across cycles (#18): the same decisions.

A `Scheduler` that visits the queue class by class (`scheduler.core.pending`) must decide,
explain and stand exactly as a cycle that takes every job one by one and keeps nothing, over
chains of cycles with arrivals, ends, time, usage, org and node changes; and the classes it
keeps must be those built anew from each queue.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import Scheduler, schedule
from scheduler.core import cycle as cycle_module
from scheduler.core.order import class_order_holds, priority_of, priority_order
from scheduler.core.pending import PendingClasses, class_key
from scheduler.core.types import (
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
from tests.core.test_properties import advance, snapshots

STEPS = ["submit", "end", "time", "same-nodes", "drain", "usage", "org", "limit", "same"]


def with_classes(snap: Snapshot, rnd: random.Random) -> Snapshot:
    """More jobs of the snapshot's classes: copies under new ids, submitted at other (and
    equal) times, and a policy that may protect gangs and cap ages within the run."""
    pending = list(snap.pending)
    next_id = 500
    for job in snap.pending:
        for _ in range(rnd.choice([0, 1, 2, 5])):
            next_id += 1
            pending.append(
                replace(
                    job,
                    job_id=next_id,
                    user_id=rnd.randint(1, 3),
                    submitted_at=rnd.choice([-100.0, -50.0, -50.0, 0.0, job.submitted_at]),
                )
            )
    rnd.shuffle(pending)
    config = replace(
        snap.config,
        protect_gang_gpus=rnd.choice([0, 4, 16, 33]),
        protect_gang_after_s=rnd.choice([0.0, 60.0]),
        age_max_s=rnd.choice([7 * 86_400.0, 120.0, 3.0]),
        weight_age=rnd.choice([1_000.0, 1_000.0, 0.0, 7.0]),
        weight_class=rnd.choice([5_000.0, 5_000.0, 100.0]),
        consolidate=rnd.random() < 0.2,
        consolidate_after_s=rnd.choice([0.0, 60.0]),
    )
    return replace(snap, pending=tuple(pending), config=config)


def step(
    s: Snapshot, first: Snapshot, what: str, rnd: random.Random, next_id: int
) -> tuple[Snapshot, int]:
    if what == "submit":
        extra = []
        for _ in range(rnd.randint(1, 6)):
            next_id += 1
            template = rnd.choice(s.pending or first.pending)
            extra.append(replace(template, job_id=next_id, submitted_at=s.now))
        s = replace(s, pending=s.pending + tuple(extra))
    elif what == "end" and s.running:
        gone = set(rnd.sample([r.job_id for r in s.running], rnd.randint(1, len(s.running))))
        s = replace(s, running=tuple(r for r in s.running if r.job_id not in gone))
    elif what == "same-nodes":
        s = replace(s, nodes=tuple(replace(n) for n in s.nodes))
    elif what == "drain":
        victim = rnd.choice(s.nodes).id
        s = replace(s, nodes=tuple(replace(n, schedulable=n.id != victim) for n in s.nodes))
    elif what == "usage":
        s = replace(s, orgs=tuple(replace(o, usage=rnd.choice([0.0, 1e3, 1e6])) for o in s.orgs))
    elif what in ("org", "limit"):
        o = rnd.choice(s.orgs)
        if what == "limit":
            changed = replace(o, limit={"H100": rnd.choice([0, 4, 9, 30])})
        else:
            changed = replace(
                o, guaranteed={t: g + 8 for t, g in o.guaranteed.items()} or {"A100": 8}
            )
        s = replace(s, orgs=tuple(changed if x is o else x for x in s.orgs))
    elif what == "same":
        # The same jobs in new objects and another order: the kept classes are rebuilt or
        # corrected, never trusted by identity alone.
        pending = [replace(j) for j in s.pending]
        rnd.shuffle(pending)
        s = replace(s, pending=tuple(pending))
    return s, next_id


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    snapshots(),
    st.lists(st.sampled_from(STEPS), max_size=8),
    st.randoms(use_true_random=False),
)
def test_the_queue_by_class_decides_as_job_by_job(
    snap: Snapshot, steps: list[str], rnd: random.Random
) -> None:
    """Decisions, explanations and standings equal, cycle after cycle, to a cycle that keeps
    nothing and takes the queue job by job; the kept classes equal classes built anew."""
    s = first = with_classes(snap, rnd)
    by_class = Scheduler(by_class=True)
    chosen = Scheduler()  # by class when the queue has few classes for its jobs
    next_id = 10_000
    for what in [*steps, "time"]:
        expected = digest(schedule(s))
        assert digest(by_class.schedule(s)) == expected, what
        assert digest(chosen.schedule(s)) == expected, what
        kept = by_class._classes
        assert kept is not None
        assert classes_of(kept) == classes_of(PendingClasses(s.pending)), what
        d = schedule(s)
        s = advance(s, d, rnd.choice([1.0, 30.0, 700.0]))
        s, next_id = step(s, first, what, rnd, next_id)


def classes_of(kept: PendingClasses) -> dict[object, list[int]]:
    return {k: list(c.ids) for k, c in kept.classes.items() if c.ids}


def test_a_queue_of_few_classes_is_visited_a_few_jobs_per_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3,000 borrowers of 3 classes with nothing idle: one job of each class looked at in each
    pass (job by job, every one of them twice), and all of them explained alike."""
    nodes = tuple(
        Node(id=i, name=f"n{i}", site="s1", domain="d1", gpu_type="H100", gpus=tuple(range(8)))
        for i in range(1, 5)
    )
    orgs = (Org(1, "a", None, 1.0, {"H100": 0}), Org(2, "b", None, 1.0, {"H100": 0}))
    running = tuple(
        RunningJob(9000 + i, 1, 1, "H100", (Placement(i, tuple(range(8))),), 0.0, 7200.0)
        for i in range(1, 5)
    )
    pending = tuple(
        PendingJob(
            job_id=i,
            org_id=1 + i % 2,
            user_id=1,
            gpus_per_node=(1, 2, 8)[i % 3],
            nodes=1,
            time_limit_s=3600.0,
            submitted_at=float(-i),
            preemptible=True,
        )
        for i in range(3000)
    )
    snap = Snapshot(100.0, nodes, orgs, running, pending, PolicyConfig(preemption=False))
    visited: list[str] = []
    consider, borrow = cycle_module.Cycle._consider, cycle_module.Cycle._borrow

    def counted_consider(
        self: cycle_module.Cycle, job: PendingJob, types: tuple[str, ...]
    ) -> object:
        visited.append("consider")
        return consider(self, job, types)

    def counted_borrow(self: cycle_module.Cycle, job: PendingJob, types: tuple[str, ...]) -> bool:
        visited.append("borrow")
        return borrow(self, job, types)

    monkeypatch.setattr(cycle_module.Cycle, "_consider", counted_consider)
    monkeypatch.setattr(cycle_module.Cycle, "_borrow", counted_borrow)
    kept = Scheduler()
    d = kept.schedule(snap)
    assert d.starts == ()
    # Six classes: two orgs × three shapes (job i is of org 1 + i % 2 and shape i % 3).
    assert visited.count("consider") == 6
    assert visited.count("borrow") == 6
    assert digest(d) == digest(schedule(snap))
    # The next cycle, one job gone and one come: the classes are corrected, not rebuilt.
    later = replace(
        snap, now=130.0, pending=(*snap.pending[1:], replace(snap.pending[0], job_id=5000))
    )
    expected = digest(schedule(later))
    visited.clear()
    assert digest(kept.schedule(later)) == expected
    assert kept.classes_built == 1
    assert visited.count("consider") == 6


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([-1e6, -604_799.99999999, -100.0, -50.0, 0.0, 3.0]), st.integers(1, 3)
        ),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from([7 * 86_400.0, 604_800.0, 50.0, 3.0, 1.0]),
    st.sampled_from([0.0, 1.0, 1_000.0, 7.0, 1e300]),
    st.sampled_from(["multifactor", "fifo"]),
)
def test_within_a_class_the_order_is_submit_order_and_priorities_agree(
    jobs: list[tuple[float, int]], age_max: float, w_age: float, ordering: str
) -> None:
    cfg = PolicyConfig(age_max_s=age_max, weight_age=w_age, ordering=ordering)
    pending = tuple(
        PendingJob(i + 1, org, 1, 1, 1, 3600.0, sub) for i, (sub, org) in enumerate(jobs)
    )
    factor = {1: 0.25, 2: 0.5}
    order = priority_order(pending, cfg, 0.0, factor, 64)
    prio = priority_of(cfg, 0.0, factor, 64)
    assert [p for _, p in order] == [prio(j) for j, _ in order]
    if class_order_holds(cfg):
        for org in (1, 2, 3):
            own = [j for j, _ in order if j.org_id == org]
            assert own == sorted(own, key=lambda j: (j.submitted_at, j.job_id))


def test_orders_a_cycle_by_class_cannot_keep_take_the_queue_job_by_job() -> None:
    cfg = PolicyConfig(weight_age=-1.0)
    assert not class_order_holds(cfg)
    assert class_order_holds(PolicyConfig())
    assert class_order_holds(PolicyConfig(ordering="fifo", weight_age=-1.0, preemption=False))
    # With preemption an org's higher classes may be put first (`_classes_first`): the order
    # is then not the one a heap of classes keeps, unless the weights say it cannot change.
    assert not class_order_holds(PolicyConfig(ordering="fifo"))
    assert not class_order_holds(PolicyConfig(weight_class=100.0))
    assert class_order_holds(PolicyConfig(weight_class=100.0, preemption=False))


def test_class_keys_ignore_only_id_user_and_submission() -> None:
    job = PendingJob(1, 1, 1, 2, 1, 3600.0, 0.0)
    assert class_key(job) == class_key(replace(job, job_id=2, user_id=7, submitted_at=9.0))
    for change in (
        {"org_id": 2},
        {"gpus_per_node": 4},
        {"nodes": 2},
        {"time_limit_s": 60.0},
        {"gpu_type": "H100"},
        {"site": "s1"},
        {"priority_class": "high"},
        {"preemptible": True},
        {"held": True},
        {"needs_isolation": True},
        {"capabilities": frozenset({"x"})},
        {"not_before": 5.0},
        {"array_throttled": True},
        {"memory_bytes": 1},
    ):
        assert class_key(job) != class_key(replace(job, **change)), change  # type: ignore[arg-type]


def _node(i: int, t: str, site: str = "s1") -> Node:
    return Node(id=i, name=f"n{i}", site=site, domain="d1", gpu_type=t, gpus=tuple(range(8)))


def _by_age(**kw: object) -> PolicyConfig:
    # Priority by age alone: the order is submit order across orgs too.
    return PolicyConfig(weight_fairshare=0.0, weight_size=0.0, **kw)  # type: ignore[arg-type]


def test_a_limit_closed_between_two_jobs_of_a_class_is_seen_by_the_second() -> None:
    """A parent's H100 limit fills when a sibling's in-quota job starts between two borrowers of
    one class that may run on any type: the second may then borrow A100 only, and starts there
    (the first, asking both types, waits on the limit in pass 2)."""
    nodes = (_node(1, "H100"), _node(2, "H100"), _node(3, "A100"))
    orgs = (
        Org(1, "p", None, 1.0, {}, limit={"H100": 8}),
        Org(2, "c1", 1, 1.0, {"H100": 4}),
        Org(3, "c2", 1, 1.0, {}),
    )
    running = (RunningJob(900, 3, 1, "H100", (Placement(1, (0, 1, 2, 3)),), 0.0, 7200.0),)
    a1 = PendingJob(1, 3, 1, 4, 1, 3600.0, -300.0, preemptible=True)
    b = PendingJob(2, 2, 1, 4, 1, 3600.0, -200.0, gpu_type="H100")
    a2 = replace(a1, job_id=3, submitted_at=-100.0)
    snap = Snapshot(0.0, nodes, orgs, running, (a1, b, a2), _by_age(preemption=False))
    expected = schedule(snap)
    assert {s.job_id for s in expected.starts} == {2, 3}
    assert digest(Scheduler(by_class=True).schedule(snap)) == digest(expected)


def test_a_class_partly_in_quota_is_asked_again_once_its_quota_is_used() -> None:
    """A borrower class that is in quota on A100 (where nothing is free at its site) borrows
    H100 only; once a job of its org of another class (another site) uses the A100 guarantee,
    the class's next job borrows on both types and waits on A100's account, not H100's."""
    nodes = (_node(1, "A100", "s1"), _node(2, "A100", "s2"), _node(3, "H100", "s1"))
    orgs = (Org(1, "o", None, 1.0, {"A100": 4}), Org(2, "other", None, 1.0, {}))
    running = (
        RunningJob(900, 2, 1, "A100", (Placement(1, tuple(range(8))),), 0.0, 7200.0),
        RunningJob(901, 2, 1, "H100", (Placement(3, (0, 1, 2, 3)),), 0.0, 7200.0),
    )
    x1 = PendingJob(1, 1, 1, 4, 1, 3600.0, -300.0, site="s1", preemptible=True)
    y = PendingJob(2, 1, 1, 4, 1, 3600.0, -200.0, gpu_type="A100", site="s2")
    x2 = replace(x1, job_id=3, submitted_at=-100.0)
    snap = Snapshot(0.0, nodes, orgs, running, (x1, y, x2), _by_age(preemption=False))
    expected = schedule(snap)
    assert {s.job_id for s in expected.starts} == {1, 2}
    assert "A100" in expected.pending[3].reasons[0].message
    assert digest(Scheduler(by_class=True).schedule(snap)) == digest(expected)


def test_a_job_without_an_ordered_submission_time_leaves_its_class() -> None:
    # NaN compares false both ways, so bisecting cannot find it: it is looked for by identity.
    jobs = tuple(PendingJob(i, 1, 1, 1, 1, 3600.0, float(i)) for i in range(1, 6))
    odd = PendingJob(9, 1, 1, 1, 1, 3600.0, float("nan"))
    kept = PendingClasses((*jobs, odd))
    assert kept.advance(jobs)
    assert classes_of(kept) == classes_of(PendingClasses(jobs))


def test_without_borrowing_the_queue_is_taken_job_by_job_unless_asked() -> None:
    """Guarantees as limits (slurm-like, fifo): jobs beyond their guarantee are asked one by
    one, so a kept `Scheduler` does not keep classes for them; it does when asked."""
    jobs = tuple(PendingJob(i, 1, 1, 1, 1, 3600.0, float(-i)) for i in range(1, 50))
    nodes = (_node(1, "H100"),)
    orgs = (Org(1, "o", None, 1.0, {"H100": 2}),)
    slurm_like = PolicyConfig(borrowing=False, preemption=False)
    snap = Snapshot(0.0, nodes, orgs, (), jobs, slurm_like)
    chosen, asked = Scheduler(), Scheduler(by_class=True)
    assert digest(chosen.schedule(snap)) == digest(asked.schedule(snap)) == digest(schedule(snap))
    assert (chosen.classes_built, asked.classes_built) == (0, 1)
    strict = Scheduler()
    strict.schedule(replace(snap, config=replace(slurm_like, ordering="fifo", backfill=False)))
    assert strict.classes_built == 0
    kept = Scheduler()
    kept.schedule(replace(snap, config=PolicyConfig(preemption=False)))
    assert kept.classes_built == 1


def test_borrowers_of_a_class_behind_the_strict_orders_blocked_head_wait_behind_it() -> None:
    """Strict order (no backfill): borrowers x1 and x2 of one class are deferred to pass 2
    whole when x1 is visited, but in-quota y, between them in the order, blocks the queue: x1
    (ahead of y) borrows, x2 (behind it) waits behind y as job by job (found by hypothesis:
    the class's later job started past the blocked head)."""
    nodes = (_node(1, "A100"), _node(2, "H100"))
    orgs = (
        Org(1, "borrower", None, 1.0, {}),
        Org(2, "owner", None, 1.0, {"A100": 8}, limit={"H100": 0}),
    )
    running = (RunningJob(900, 1, 1, "A100", (Placement(1, tuple(range(7))),), 0.0, 7200.0),)
    x1 = PendingJob(1, 1, 1, 1, 1, 3600.0, -300.0, preemptible=True)
    z = PendingJob(2, 2, 1, 1, 1, 3600.0, -250.0)  # takes the last A100 in quota
    y = PendingJob(3, 2, 1, 1, 1, 3600.0, -200.0)  # in quota, nothing free: blocks
    x2 = replace(x1, job_id=4, submitted_at=-100.0)
    snap = Snapshot(0.0, nodes, orgs, running, (x1, z, y, x2), _by_age(backfill=False))
    expected = schedule(snap)
    assert expected.blocked_by == 3
    assert {s.job_id for s in expected.starts} == {1, 2}
    assert expected.reasons[4] == ReasonCode.PRIORITY
    assert digest(Scheduler(by_class=True).schedule(snap)) == digest(expected)
