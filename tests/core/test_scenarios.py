"""Scenario tests of the scheduling core, each a story told with the snapshot builder."""

from __future__ import annotations

from dataclasses import replace

from scheduler.core import decay_usage, schedule
from scheduler.core.types import (
    Decisions,
    PreemptionReason,
    ReasonCode,
    Snapshot,
    UsageInterval,
)
from tests.core.builder import apply, job, nodes, org, run, snapshot


def codes(d: Decisions, job_id: int) -> list[ReasonCode]:
    return [r.code for r in d.pending[job_id].reasons]


def finish_due(s: Snapshot) -> Snapshot:
    """Jobs that reached their time limit end (they run exactly their limit in these stories)."""
    keep = tuple(r for r in s.running if r.expected_end > s.now)
    return replace(s, running=keep)


def test_single_node_job_goes_to_the_tightest_node() -> None:
    s = snapshot(
        nodes=nodes(3),
        orgs=[org(1, guaranteed=24)],
        running=[run(100, 1, [(1, range(6))]), run(101, 1, [(2, range(2))])],
        pending=[job(1, 1, 2)],
    )
    d = schedule(s)
    assert [st.placements[0].node_id for st in d.starts] == [1]
    assert d.starts[0].placements[0].gpus == (6, 7)


def test_gang_prefers_one_topology_domain() -> None:
    # Domain d0 has nodes 1-2 (one busy), domain d1 has nodes 3-4, both free.
    s = snapshot(
        nodes=nodes(4, per_domain=2),
        orgs=[org(1, guaranteed=32)],
        running=[run(100, 1, [(1, range(8))])],
        pending=[job(1, 1, 8, nodes=2)],
    )
    d = schedule(s)
    assert sorted(p.node_id for p in d.starts[0].placements) == [3, 4]


def test_gang_is_all_or_nothing() -> None:
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=24)],
        running=[run(100, 1, [(1, range(4))])],
        pending=[job(1, 1, 8, nodes=2)],
    )
    d = schedule(s)
    assert d.starts == ()
    assert codes(d, 1) == [ReasonCode.RESOURCES]
    assert d.pending[1].estimated_start == 3600.0


def test_big_gang_is_not_starved_by_a_stream_of_small_jobs() -> None:
    """A 32-GPU gang at the head holds a reservation; 1-GPU jobs only backfill around it."""
    step_s = 300.0
    running = [
        run(1000 + i, 1, [(1 + i // 8, [i % 8])], started=-(i * 100.0), limit_s=3600.0)
        for i in range(32)
    ]
    gang = job(1, 1, 8, nodes=4, at=0.0, limit_s=7200.0)
    s = snapshot(nodes=nodes(4), orgs=[org(1, guaranteed=64)], running=running, pending=[gang])
    next_id = 2
    started_at = None
    for _ in range(40):
        stream = [job(next_id + i, 1, 1, at=s.now + 1, limit_s=1800.0) for i in range(4)]
        next_id += 4
        s = replace(s, pending=s.pending + tuple(stream))
        d = schedule(s)
        if any(st.job_id == 1 for st in d.starts):
            started_at = s.now
            break
        assert ReasonCode.RESOURCES in codes(d, 1)
        s = finish_due(apply(s, d, now=s.now + step_s))
    assert started_at is not None
    # Every GPU held at t=0 is free by t=3600; the gang starts at the first cycle after that.
    assert started_at <= 3600.0 + step_s


def test_org_back_from_idle_reclaims_its_guarantee_within_one_cycle() -> None:
    grace_s = 30.0
    # Org 2 borrowed the whole cluster while org 1 was idle; all its jobs are preemptible.
    borrowed = [
        run(
            100 + i,
            2,
            [(1 + i // 2, range(4 * (i % 2), 4 * (i % 2) + 4))],
            preemptible=True,
            started=-7200.0 + i,
        )
        for i in range(8)
    ]
    s = snapshot(
        nodes=nodes(4),
        orgs=[org(1, guaranteed=16), org(2, guaranteed=16)],
        running=borrowed,
        pending=[job(1, 1, 8), job(2, 1, 8)],
        now=0.0,
        preemption_grace_s=grace_s,
    )
    d = schedule(s)
    assert {p.reason for p in d.preemptions} == {PreemptionReason.RECLAIM}
    preempted_gpus = sum(
        r.gpu_count for r in s.running if r.job_id in {p.job_id for p in d.preemptions}
    )
    assert preempted_gpus == 16  # exactly org 2's borrowed GPUs, none of its guarantee
    assert all(codes(d, j) == [ReasonCode.PREEMPTING] for j in (1, 2))
    assert all(d.pending[j].estimated_start == grace_s for j in (1, 2))
    # A second cycle before the deadline preempts nothing more for the same need.
    d_again = schedule(apply(s, d, now=10.0))
    assert d_again.preemptions == ()
    # After the grace period the victims are gone; the next cycle starts org 1's jobs.
    after = apply(s, d, now=grace_s + 1, drop=[p.job_id for p in d.preemptions])
    d2 = schedule(after)
    assert sorted(st.job_id for st in d2.starts) == [1, 2]
    assert d2.preemptions == ()


def test_preemption_never_hits_a_job_younger_than_min_runtime() -> None:
    young = [
        run(100 + i, 2, [(1 + i, range(8))], preemptible=True, started=-100.0) for i in range(2)
    ]
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=8), org(2, guaranteed=0)],
        running=young,
        pending=[job(1, 1, 8)],
        min_runtime_s=600.0,
    )
    d = schedule(s)
    assert d.preemptions == ()
    assert codes(d, 1) == [ReasonCode.RESOURCES]
    later = schedule(replace(s, now=499.0))  # the victims have run 599 s
    assert later.preemptions == ()
    old_enough = schedule(replace(s, now=500.0))  # now they have run 600 s
    assert len(old_enough.preemptions) == 1


def test_priority_class_preempts_inside_the_org_only() -> None:
    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=8), org(2, guaranteed=0)],
        running=[
            run(100, 1, [(1, range(8))], preemptible=True, priority_class="low", started=-1e4)
        ],
        pending=[job(1, 1, 8, priority_class="high")],
    )
    d = schedule(s)
    assert [(p.job_id, p.reason) for p in d.preemptions] == [(100, PreemptionReason.PRIORITY)]
    same_class = replace(s, pending=(job(1, 1, 8, priority_class="low"),))
    assert schedule(same_class).preemptions == ()


def test_absent_gpu_type_and_oversized_jobs_are_bad_constraints() -> None:
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=16)],
        pending=[
            job(1, 1, 1, gpu_type="A100"),
            job(2, 1, 16),
            job(3, 1, 8, nodes=3),
            job(4, 1, 1, site="elsewhere"),
        ],
    )
    d = schedule(s)
    assert d.starts == ()
    for j in (1, 2, 3, 4):
        assert codes(d, j) == [ReasonCode.BAD_CONSTRAINTS]
        assert d.pending[j].estimated_start is None
    assert "A100" in d.pending[1].reasons[0].message


def test_non_preemptible_job_beyond_guarantee_waits_for_quota() -> None:
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=4), org(2)],
        running=[run(100, 1, [(1, range(4))], started=0.0, limit_s=1000.0)],
        pending=[job(1, 1, 4), job(2, 1, 4, preemptible=True)],
    )
    d = schedule(s)
    assert [st.job_id for st in d.starts] == [2]
    assert d.starts[0].borrowed
    assert codes(d, 1) == [ReasonCode.QUOTA_GUARANTEED]
    assert d.pending[1].reasons[0].details["headroom"] == 0
    assert d.pending[1].estimated_start == 1000.0


def test_org_and_ancestor_limits_hold() -> None:
    s = snapshot(
        nodes=nodes(4),
        orgs=[org(1, limit=8), org(2, parent=1, guaranteed=0), org(3, guaranteed=0)],
        pending=[
            job(1, 2, 4, preemptible=True),
            job(2, 2, 8, preemptible=True),
            job(3, 2, 4, preemptible=True, at=5.0),
            job(4, 3, 8, preemptible=True),
        ],
    )
    d = schedule(s)
    started = {st.job_id for st in d.starts}
    assert started == {1, 3, 4} or started == {2, 4}
    waiting = [j for j in (1, 2, 3) if j not in started]
    for j in waiting:
        assert codes(d, j) in ([ReasonCode.ORG_LIMIT], [ReasonCode.ORG_LIMIT])
    too_big = schedule(replace(s, pending=(job(9, 2, 8, nodes=2, preemptible=True),)))
    assert codes(too_big, 9) == [ReasonCode.ORG_LIMIT]
    assert too_big.pending[9].estimated_start is None


def test_fifo_baseline_is_strict_submit_order() -> None:
    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=16)],
        running=[run(100, 1, [(1, range(4))], limit_s=600.0)],
        pending=[job(1, 1, 8, at=0.0), job(2, 1, 1, at=1.0)],
        ordering="fifo",
        backfill=False,
        borrowing=False,
        preemption=False,
    )
    d = schedule(s)
    assert d.starts == ()
    assert codes(d, 1) == [ReasonCode.RESOURCES]
    assert codes(d, 2) == [ReasonCode.PRIORITY]
    assert d.pending[2].reasons[0].details["behind_job_id"] == 1
    backfilled = schedule(replace(s, config=replace(s.config, backfill=True)))
    # With backfill the 1-GPU job may run only if it cannot delay job 1 (it ends after 600 s).
    assert backfilled.starts == ()
    short = replace(
        s,
        pending=(job(1, 1, 8, at=0.0), job(2, 1, 1, at=1.0, limit_s=300.0)),
        config=replace(s.config, backfill=True),
    )
    assert [st.job_id for st in schedule(short).starts] == [2]


def test_slurm_like_baseline_treats_guarantees_as_limits() -> None:
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=8)],
        pending=[job(1, 1, 8, preemptible=True), job(2, 1, 8, preemptible=True)],
        borrowing=False,
    )
    d = schedule(s)
    assert len(d.starts) == 1
    assert codes(d, 2) == [ReasonCode.QUOTA_GUARANTEED]


def test_held_and_dependency_jobs_are_explained() -> None:
    from scheduler.core.types import DependencyState

    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=8)],
        pending=[
            job(1, 1, 1, held=True),
            job(2, 1, 1, dependency=DependencyState.WAITING),
            job(3, 1, 1, dependency=DependencyState.NEVER),
        ],
    )
    d = schedule(s)
    assert codes(d, 1) == [ReasonCode.JOB_HELD_USER]
    assert codes(d, 2) == [ReasonCode.DEPENDENCY]
    assert codes(d, 3) == [ReasonCode.DEPENDENCY_NEVER_SATISFIED]
    assert d.starts == ()


def test_shares_two_to_one_give_gpu_hours_two_to_one_over_a_day() -> None:
    """Two orgs with endless demand: fair share (decayed usage fed back) splits GPU-hours 2:1."""
    step_s = 300.0
    orgs = [org(1, shares=2.0, guaranteed=16), org(2, shares=1.0, guaranteed=16)]
    s = snapshot(nodes=nodes(2), orgs=orgs)
    usage: dict[int, float] = {}
    gpu_s = {1: 0.0, 2: 0.0}
    next_id = 1
    horizon_s = 86_400.0
    while s.now < horizon_s:
        # Keep a backlog for both orgs.
        pend = list(s.pending)
        for o in (1, 2):
            waiting = sum(1 for j in pend if j.org_id == o)
            for _ in range(20 - waiting):
                pend.append(job(next_id, o, 1, at=s.now, limit_s=3600.0))
                next_id += 1
        s = replace(s, pending=tuple(pend))
        d = schedule(s)
        s = apply(s, d)
        nxt = s.now + step_s
        ivs = [
            UsageInterval(r.org_id, r.gpu_type, r.gpu_count, r.started_at, min(r.expected_end, nxt))
            for r in s.running
        ]
        for iv in ivs:
            gpu_s[iv.org_id] += iv.gpus * (iv.end - max(iv.start, s.now))
        usage = decay_usage(usage, s.now, ivs, nxt, half_life_s=s.config.half_life_s)
        s = finish_due(
            replace(
                s,
                now=nxt,
                orgs=tuple(replace(o, usage=usage.get(o.id, 0.0)) for o in s.orgs),
            )
        )
    ratio = gpu_s[1] / gpu_s[2]
    assert abs(ratio - 2.0) / 2.0 < 0.05, ratio


def test_every_pending_job_has_an_estimate_when_it_can_run() -> None:
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=16)],
        running=[run(100, 1, [(1, range(8)), (2, range(8))], limit_s=1000.0)],
        pending=[job(i, 1, 8, at=float(i)) for i in range(1, 6)],
    )
    d = schedule(s)
    ests = [d.pending[i].estimated_start for i in range(1, 6)]
    assert all(e is not None for e in ests)
    assert ests == sorted(ests)  # type: ignore[type-var]
    assert ests[0] == 1000.0


def test_idle_gpus_are_lent_lowest_weighted_share_first() -> None:
    # Org 2 already borrows 8 GPUs, org 3 nothing: the 8 idle GPUs go to org 3 first.
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=16), org(2), org(3)],
        running=[run(100, 2, [(1, range(8))], preemptible=True)],
        pending=[job(1, 2, 8, preemptible=True, at=0.0), job(2, 3, 8, preemptible=True, at=5.0)],
    )
    d = schedule(s)
    assert [(st.job_id, st.borrowed) for st in d.starts] == [(2, True)]
    assert codes(d, 1) == [ReasonCode.RESOURCES]
    assert float(d.pending[1].reasons[0].details["weighted_share"]) > 0


def test_reclaim_takes_from_the_most_over_share_org_first() -> None:
    # Orgs 2 and 3 both borrow; org 2 borrows 12 GPUs, org 3 only 4 (equal shares). Org 2's
    # youngest job goes; org 3's job, though as small, stays.
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=8), org(2), org(3)],
        running=[
            run(100, 2, [(1, range(8))], preemptible=True, started=-1e4),
            run(101, 2, [(2, range(4))], preemptible=True, started=-5e3),
            run(102, 3, [(2, range(4, 8))], preemptible=True, started=-1e4),
        ],
        pending=[job(1, 1, 4)],
    )
    d = schedule(s)
    assert [p.job_id for p in d.preemptions] == [101]


def test_borrowers_never_preempt_other_orgs() -> None:
    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1), org(2)],
        running=[run(100, 2, [(1, range(8))], preemptible=True, started=-1e4)],
        pending=[job(1, 1, 8, preemptible=True, priority_class="high")],
    )
    d = schedule(s)
    assert d.preemptions == ()
    assert d.starts == ()


def test_any_type_job_and_site_constraint() -> None:
    cluster = nodes(1, gpu_type="A100", site="north") + nodes(1, site="south", first_id=2)
    s = snapshot(
        nodes=cluster,
        orgs=[org(1, guaranteed={"A100": 8, "H100": 8})],
        pending=[job(1, 1, 8, gpu_type=None, site="south"), job(2, 1, 8, gpu_type=None)],
    )
    d = schedule(s)
    where = {st.job_id: st.placements[0].node_id for st in d.starts}
    assert where == {1: 2, 2: 1}


def test_reserved_gpus_are_explained_as_reservation() -> None:
    # Job 1 (16 GPUs) reserves both nodes; job 2 (1 GPU, long) may not use the withheld GPUs.
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=64)],
        running=[run(100, 1, [(1, range(4)), (2, range(4))], limit_s=600.0)],
        pending=[job(1, 1, 8, nodes=2, at=0.0), job(2, 1, 1, at=1.0, limit_s=7200.0)],
        backfill_reservations=1,
    )
    d = schedule(s)
    assert d.starts == ()
    assert d.pending[1].reasons[0].details["reservation_start"] == 600.0
    assert d.pending[1].estimated_start == 600.0
    assert codes(d, 2) == [ReasonCode.RESERVATION]
    assert d.pending[2].reasons[0].details["reserved_for_job_id"] == 1
    assert d.pending[2].estimated_start is not None
    assert d.pending[2].estimated_start >= 600.0


def test_explain_off_keeps_reasons_but_skips_estimates() -> None:
    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=16)],
        running=[run(100, 1, [(1, range(8))])],
        pending=[job(1, 1, 8)],
        explain=False,
    )
    d = schedule(s)
    assert codes(d, 1) == [ReasonCode.RESOURCES]
    assert d.pending[1].estimated_start is None


def test_priority_preemption_does_not_repeat_while_its_victim_leaves() -> None:
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=16)],
        running=[
            run(
                100 + i,
                1,
                [(1 + i, range(8))],
                preemptible=True,
                priority_class="low",
                started=-1e4,
            )
            for i in range(2)
        ],
        pending=[job(1, 1, 8, priority_class="high")],
    )
    d = schedule(s)
    assert len(d.preemptions) == 1
    again = schedule(apply(s, d, now=10.0))
    assert again.preemptions == ()
    assert codes(again, 1) == [ReasonCode.PREEMPTING]


def test_odd_inputs_are_explained_not_crashed_on() -> None:
    ghost = run(100, 1, [(99, range(8))])  # a running job on a node the snapshot lacks
    empty = snapshot(nodes=(), orgs=[org(1, guaranteed=8)], running=[ghost], pending=[job(1, 1, 1)])
    d = schedule(empty)
    assert codes(d, 1) == [ReasonCode.BAD_CONSTRAINTS]
    looped = [org(1, parent=2, guaranteed=8), org(2, parent=1)]  # a malformed tree
    other = run(101, 2, [(99, range(8))])
    s = snapshot(nodes=nodes(1), orgs=looped, running=[other], pending=[job(1, 1, 1)])
    assert [st.job_id for st in schedule(s).starts] == [1]
    zero = snapshot(nodes=nodes(1), orgs=[org(1, guaranteed=8)], pending=[job(1, 1, 0)])
    assert codes(schedule(zero), 1) == [ReasonCode.BAD_CONSTRAINTS]


def test_requeued_job_waits_for_its_begin_time_and_nothing_waits_for_it() -> None:
    s = snapshot(
        nodes=nodes(1, gpus=2),
        orgs=[org(1, guaranteed=2)],
        pending=[job(1, 1, 2, not_before=100.0), job(2, 1, 2, at=50.0)],
        now=10.0,
    )
    d = schedule(s)
    assert [st.job_id for st in d.starts] == [2]
    assert codes(d, 1) == [ReasonCode.BEGIN_TIME]
    assert d.pending[1].reasons[0].details == {"not_before": 100.0}
    later = schedule(replace(s, now=100.0, pending=(job(1, 1, 2, not_before=100.0),)))
    assert [st.job_id for st in later.starts] == [1]


def test_a_preemptors_freed_quota_is_not_taken_by_a_lower_class_job_ahead_of_it() -> None:
    """Hypothesis found job 1002 preempted twice in a world where nothing ends (strict FIFO).

    Job 9 (normal) bumps its org's low-class 1001 for room on node 4; once 1001 has left, the
    low-class job 4, ahead of 9 in submit order, took the quota 1001 freed, and 9, now beyond
    its guarantee, bumped the borrower 1002 that had started meanwhile. An org's jobs are
    considered higher class first (Kueue's queue order): 9 starts, 4 waits for quota.
    """
    s2 = tuple(replace(n, unhealthy_gpus=frozenset({0})) for n in nodes(2, site="s2", first_id=4))
    cluster = (*nodes(1, gpus=3), *s2)
    s = snapshot(
        nodes=cluster,
        orgs=[org(1, guaranteed=13)],
        running=[
            run(1001, 1, [(4, range(1, 6))], priority_class="low", preemptible=True, started=-1e4),
            run(1003, 1, [(4, (6, 7))], started=-1e4),
            run(1004, 1, [(1, range(3))], started=-1e4),
        ],
        pending=[
            job(4, 1, 4, at=0.0, priority_class="low"),
            job(9, 1, 1, nodes=2, site="s2", at=1.0),
            job(1002, 1, 3, at=500.0, priority_class="low", preemptible=True),
        ],
        now=700.0,
        ordering="fifo",
        backfill=False,
    )
    d = schedule(s)
    assert [(p.job_id, p.preemptor_job_id) for p in d.preemptions] == [(1001, 9)]
    assert [st.job_id for st in d.starts] == [1002]
    later = apply(s, d, now=1400.0, drop=[1001])  # 1001 has left (it may requeue, low class)
    later = replace(
        later, pending=(*later.pending, job(1001, 1, 5, at=730.0, priority_class="low"))
    )
    d2 = schedule(later)
    assert d2.preemptions == ()
    assert [st.job_id for st in d2.starts] == [9]
    assert codes(d2, 4) == [ReasonCode.QUOTA_GUARANTEED]
