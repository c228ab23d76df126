"""Big gangs that have waited are protected: settled first, with a reservation nobody pushes back.

Docs: docs/SCHEDULING.md section 6. A borrowing gang otherwise never holds a reservation (only
in-quota jobs do), so 1-GPU borrowers take every GPU that frees up before whole nodes gather.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import schedule
from scheduler.core.types import (
    Decisions,
    Node,
    Org,
    PendingJob,
    Placement,
    PolicyConfig,
    ReasonCode,
    RunningJob,
    Snapshot,
)
from tests.core.builder import apply, job, nodes, org, run, snapshot

HOUR_S = 3600.0
NOW = 7 * HOUR_S  # past the default protect_gang_after_s (6 h) for a job submitted at 0


def busy_cluster() -> list:  # type: ignore[type-arg]
    """Five nodes full of org 1's 1-GPU borrowers; node k's jobs end k hours from now."""
    return [
        run(
            1000 + 8 * (k - 1) + g,
            1,
            [(k, [g])],
            started=NOW - 2 * HOUR_S,
            limit_s=2 * HOUR_S + k * HOUR_S,
            preemptible=True,
        )
        for k in range(1, 6)
        for g in range(8)
    ]


def orgs() -> list:  # type: ignore[type-arg]
    # Org 1 borrows everything; org 2 (the gang's) has a small guarantee; org 3 is unused.
    return [org(1, guaranteed=0), org(2, guaranteed=8), org(3, guaranteed=16)]


def gang(job_id: int = 1, at: float = 0.0) -> object:
    return job(job_id, 2, 8, nodes=5, at=at, limit_s=4 * HOUR_S, preemptible=True)


def test_a_waiting_big_borrower_gang_gets_a_reservation_that_says_where_and_when() -> None:
    s = snapshot(nodes=nodes(5), orgs=orgs(), running=busy_cluster(), pending=[gang()], now=NOW)
    d = schedule(s)
    info = d.pending[1]
    reason = info.reasons[0]
    assert reason.code is ReasonCode.RESOURCES
    # Every node is needed, so the reservation starts when the last one is free: 5 hours.
    assert reason.details["reservation_start"] == NOW + 5 * HOUR_S
    assert reason.details["reserved_nodes"] == "s1-n1,s1-n2,s1-n3,s1-n4,s1-n5"
    assert reason.details["protected_since"] == 6 * HOUR_S
    assert "reserved nodes s1-n1,s1-n2,s1-n3,s1-n4,s1-n5 from 1970-01-01T12:00:00Z" in (
        reason.message
    )
    assert info.estimated_start == NOW + 5 * HOUR_S


def test_before_its_wait_is_long_enough_a_borrower_gang_holds_nothing() -> None:
    s = snapshot(
        nodes=nodes(5),
        orgs=orgs(),
        running=busy_cluster(),
        pending=[gang(at=NOW - HOUR_S)],
        now=NOW,
    )
    reason = schedule(s).pending[1].reasons[0]
    assert "reservation_start" not in reason.details
    assert reason.message.startswith("borrowing")


def test_later_jobs_cannot_take_its_nodes_unless_they_end_before_it_starts() -> None:
    # One node frees at once (its jobs just ended); the gang reserves it with the others.
    running = [r for r in busy_cluster() if r.placements[0].node_id != 1]
    pending = [
        gang(),
        # Org 3 is in quota and its jobs come first by fair share; the long one must wait.
        job(2, 3, 1, at=NOW - 60, limit_s=10 * HOUR_S),
        job(3, 3, 1, at=NOW - 60, limit_s=HOUR_S),
        # A borrower of org 1 (lent in pass 2) that would run past the reservation.
        job(4, 1, 1, at=NOW - 60, limit_s=10 * HOUR_S, preemptible=True),
    ]
    s = snapshot(nodes=nodes(5), orgs=orgs(), running=running, pending=pending, now=NOW)
    d = schedule(s)
    started = {st.job_id: st.placements[0].node_id for st in d.starts}
    assert started == {3: 1}  # the short one backfills: it ends before the reservation
    assert d.pending[1].reasons[0].details["reservation_start"] == NOW + 5 * HOUR_S
    assert 2 in d.pending
    assert 4 in d.pending


def test_without_protection_the_same_queue_takes_the_free_node() -> None:
    running = [r for r in busy_cluster() if r.placements[0].node_id != 1]
    pending = [gang(), job(2, 3, 1, at=NOW - 60, limit_s=10 * HOUR_S)]
    s = snapshot(
        nodes=nodes(5), orgs=orgs(), running=running, pending=pending, now=NOW, protect_gang_gpus=0
    )
    d = schedule(s)
    assert [st.job_id for st in d.starts] == [2]
    assert "reservation_start" not in d.pending[1].reasons[0].details


def test_one_protected_gang_per_org_the_oldest() -> None:
    s = snapshot(
        nodes=nodes(10),
        orgs=orgs(),
        running=busy_cluster()
        + [
            run(2000 + k, 1, [(k, range(8))], started=NOW - HOUR_S, limit_s=3 * HOUR_S)
            for k in range(6, 11)
        ],
        pending=[gang(1, at=100.0), gang(2, at=50.0)],
        now=NOW,
    )
    d = schedule(s)
    assert "reserved_nodes" in d.pending[2].reasons[0].details
    assert "reserved_nodes" not in d.pending[1].reasons[0].details


def test_reclaim_leaves_a_protected_gangs_nodes_alone() -> None:
    # Org 3 wants its guarantee back; every borrower sits on nodes reserved for the gang.
    pending = [gang(), job(2, 3, 8, at=NOW - 60, limit_s=HOUR_S)]
    s = snapshot(nodes=nodes(5), orgs=orgs(), running=busy_cluster(), pending=pending, now=NOW)
    d = schedule(s)
    assert d.preemptions == ()
    assert d.starts == ()
    # Without the gang, the same reclaim preempts borrowers at once.
    alone = snapshot(
        nodes=nodes(5), orgs=orgs(), running=busy_cluster(), pending=pending[1:], now=NOW
    )
    assert len(schedule(alone).preemptions) == 8


def test_a_protected_gang_that_fits_starts_before_borrowers_lent_to_first() -> None:
    # Five free nodes and a sixth held by org 2, which so borrows more than org 3: lending
    # alone would serve org 3's 1-GPU borrowers first and leave no five whole nodes.
    pending = [gang()] + [
        job(10 + i, 3, 1, at=NOW - 60, limit_s=HOUR_S, preemptible=True) for i in range(24)
    ]
    held = [run(500, 2, [(6, range(8))], started=NOW - HOUR_S, preemptible=True)]
    teams = [org(1), org(2), org(3)]

    def decide(**config: object) -> set[int]:
        s = snapshot(nodes=nodes(6), orgs=teams, running=held, pending=pending, now=NOW, **config)
        return {st.job_id for st in schedule(s).starts if st.borrowed}

    assert 1 in decide()
    assert 1 not in decide(protect_gang_gpus=0)


@st.composite
def saturated(draw: st.DrawFn) -> tuple[Snapshot, list[PendingJob]]:
    """A busy cluster, an old protected gang (job 1), a queue, and the jobs arriving next."""
    count = draw(st.integers(2, 6))
    cluster = tuple(
        Node(
            i + 1,
            f"n{i + 1}",
            draw(st.sampled_from(["s1", "s1", "s2"])),
            "d1",
            "H100",
            tuple(range(8)),
        )
        for i in range(count)
    )
    orgs = [
        Org(o, f"o{o}", guaranteed={"H100": draw(st.sampled_from([0, 8, 16]))}) for o in (1, 2, 3)
    ]
    free = {n.id: list(range(8)) for n in cluster}
    running = []
    for i in range(draw(st.integers(0, 16))):
        nid = draw(st.sampled_from(sorted(free)))
        size = draw(st.integers(1, 8))
        if len(free[nid]) < size:
            continue
        gpus = tuple(free[nid][:size])
        del free[nid][:size]
        running.append(
            RunningJob(
                100 + i,
                draw(st.sampled_from([1, 2, 3])),
                1,
                "H100",
                (Placement(nid, gpus),),
                NOW - draw(st.sampled_from([0.0, 700.0, 5000.0])),
                draw(st.sampled_from([600.0, 3600.0, 7200.0, 36000.0])),
                preemptible=draw(st.booleans()),
            )
        )

    def smalls(first: int, at: float, n: int) -> list[PendingJob]:
        return [
            PendingJob(
                first + i,
                draw(st.sampled_from([1, 2, 3])),
                1,
                draw(st.sampled_from([1, 2, 4, 8])),
                draw(st.sampled_from([1, 1, 2])),
                draw(st.sampled_from([300.0, 3600.0, 36000.0])),
                at,
                "H100",
                preemptible=draw(st.booleans()),
                priority_class=draw(st.sampled_from(["low", "normal", "high"])),
            )
            for i in range(n)
        ]

    gpn = draw(st.sampled_from([4, 8]))
    big = PendingJob(
        1,
        draw(st.sampled_from([1, 2, 3])),
        1,
        gpn,
        draw(st.integers(2, count)),
        7200.0,
        0.0,
        "H100",
        preemptible=True,
    )
    pending = [big, *smalls(10, NOW - 100.0, draw(st.integers(0, 10)))]
    config = PolicyConfig(protect_gang_gpus=8)
    snap = Snapshot(NOW, cluster, tuple(orgs), tuple(running), tuple(pending), config)
    return snap, smalls(100, NOW + 1, draw(st.integers(0, 10)))


def _reservation_start(d: Decisions) -> float | None:
    info = d.pending.get(1)
    if info is None:
        return None  # started
    details = info.reasons[0].details
    return float(details["reservation_start"]) if "reserved_nodes" in details else None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(saturated(), st.sampled_from([60.0, 1800.0, 4000.0]))
def test_a_protected_gangs_start_never_moves_later_because_of_later_jobs(
    case: tuple[Snapshot, list[PendingJob]], step_s: float
) -> None:
    snap, arrivals = case
    d = schedule(snap)
    start = _reservation_start(d)
    if start is None:
        return  # it started, or reclaims its guarantee (Preempting)
    later = apply(snap, d, now=snap.now + step_s)
    # Jobs end at their time limit at the latest; victims leave at their deadline.
    later = replace(
        later,
        running=tuple(
            r
            for r in later.running
            if r.expected_end > later.now
            and not (
                r.preempting and r.preempt_deadline is not None and r.preempt_deadline <= later.now
            )
        ),
        pending=later.pending + tuple(arrivals),
    )
    d2 = schedule(later)
    if 1 not in d2.pending:
        return  # it started
    reason = d2.pending[1].reasons[0]
    if reason.code is ReasonCode.PREEMPTING:
        assert float(reason.details["ready_at"]) <= max(
            start, later.now + snap.config.preemption_grace_s
        )
        return
    again = _reservation_start(d2)
    assert again is not None, reason
    assert again <= max(start, later.now)


def test_higher_priority_jobs_in_quota_no_longer_push_an_in_quota_gang_back() -> None:
    # slurm-like (no borrowing, no preemption): the gang of org 2 is in quota but org 2 has
    # used a lot, so org 3's long 1-GPU job ranks first and, unprotected, takes the free node.
    running = [r for r in busy_cluster() if r.placements[0].node_id != 1]
    teams = [org(1, guaranteed=40), org(2, guaranteed=40, usage=1e9), org(3, guaranteed=8)]
    pending = [
        job(1, 2, 8, nodes=5, at=0.0, limit_s=4 * HOUR_S),
        job(2, 3, 1, at=NOW - 60, limit_s=10 * HOUR_S),
    ]

    def decide(**config: object) -> tuple[set[int], object]:
        s = snapshot(
            nodes=nodes(5),
            orgs=teams,
            running=running,
            pending=pending,
            now=NOW,
            borrowing=False,
            preemption=False,
            **config,
        )
        d = schedule(s)
        return {st.job_id for st in d.starts}, d.pending[1].reasons[0].details.get(
            "reservation_start"
        )

    assert decide() == (set(), NOW + 5 * HOUR_S)
    # Unprotected, the long job takes a GPU of node 1, which is then free only at its end.
    assert decide(protect_gang_gpus=0) == ({2}, NOW + 10 * HOUR_S)
