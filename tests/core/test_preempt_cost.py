"""Victims are chosen by the least work a preemption loses (#19 item 3)."""

from __future__ import annotations

from scheduler.core import schedule
from scheduler.core.preempt import work_lost_s
from tests.core.builder import job, nodes, org, run, snapshot

HOUR_S = 3_600.0


def test_work_lost_counts_from_the_last_checkpoint_or_the_start() -> None:
    every_30_min = run(1, 1, [(1, [0])], started=0.0, checkpoint_interval_s=1_800.0)
    assert work_lost_s(every_30_min, 1_900.0) == 100.0
    assert work_lost_s(every_30_min, 3_599.0) == 1_799.0
    assert work_lost_s(run(2, 1, [(1, [1])], started=0.0), 1_900.0) == 1_900.0


def test_reclaim_takes_the_job_that_just_checkpointed() -> None:
    # Two equal borrowers of org 2 on two nodes, both past the minimum runtime. Node 1's job
    # checkpointed 10 s ago (at 1 h), node 2's is due in 40 s: the kill 30 s from now would
    # lose 40 s of work on node 1 and 29 min 50 s on node 2.
    every_30_min = {"preemptible": True, "checkpoint_interval_s": 1_800.0}
    borrowers = [
        run(100, 2, [(1, range(8))], started=-HOUR_S - 10.0, **every_30_min),
        run(101, 2, [(2, range(8))], started=-HOUR_S + 40.0, **every_30_min),
    ]
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=8), org(2)],
        running=borrowers,
        pending=[job(1, 1, 8)],
        now=0.0,
    )
    assert [p.job_id for p in schedule(s).preemptions] == [100]


def test_without_checkpoints_the_youngest_work_goes() -> None:
    # Nothing known of checkpoints: everything since the start is lost, so the job that
    # started last loses least, though it holds as many GPUs.
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=8), org(2)],
        running=[
            run(100, 2, [(1, range(8))], preemptible=True, started=-5 * HOUR_S),
            run(101, 2, [(2, range(8))], preemptible=True, started=-HOUR_S),
        ],
        pending=[job(1, 1, 8)],
    )
    assert [p.job_id for p in schedule(s).preemptions] == [101]


def test_no_job_is_preempted_for_gpus_the_task_does_not_need() -> None:
    # Node 1: a 1-GPU borrower that loses little and a 7-GPU one. A 7-GPU task needs only the
    # 7-GPU job's GPUs: taking the cheap one first, then the big one, would also kill the cheap
    # one for a GPU nobody uses.
    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=8), org(2)],
        running=[
            run(100, 2, [(1, [0])], preemptible=True, started=-HOUR_S),
            run(101, 2, [(1, range(1, 8))], preemptible=True, started=-HOUR_S),
        ],
        pending=[job(1, 1, 7)],
    )
    assert [p.job_id for p in schedule(s).preemptions] == [101]


def test_a_gang_that_would_still_not_fit_preempts_nothing() -> None:
    # Org 1's 16-GPU gang is in quota, but only one node's borrower may be preempted (node 2
    # runs org 3's job inside its own guarantee): no half measures.
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=16), org(2), org(3, guaranteed=8)],
        running=[
            run(100, 2, [(1, range(8))], preemptible=True, started=-HOUR_S),
            run(101, 3, [(2, range(8))], preemptible=True, started=-HOUR_S),
        ],
        pending=[job(1, 1, 8, nodes=2)],
    )
    assert schedule(s).preemptions == ()
