"""Victims are chosen by the least work a preemption loses (#19 item 3)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_one_job_that_loses_less_goes_rather_than_two_cheaper_first() -> None:
    # A 3-GPU task on a full node. Kills 30 s from now lose (GPUs × time since start): the
    # 2-GPU job 102 1,260 GPU-s, the 2-GPU job 100 4,060, the 4-GPU job 101 4,120. Taking the
    # cheapest first (102, then 100: 4 GPUs, enough, neither can be left out) loses 5,320;
    # 101 alone frees as many GPUs and loses 4,120.
    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=8), org(2)],
        running=[
            run(100, 2, [(1, [0, 1])], preemptible=True, started=-2_000.0),
            run(101, 2, [(1, [2, 3, 4, 5])], preemptible=True, started=-1_000.0),
            run(102, 2, [(1, [6, 7])], preemptible=True, started=-600.0),
        ],
        pending=[job(1, 1, 3)],
    )
    assert [p.job_id for p in schedule(s).preemptions] == [101]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 1, 2, 3, 4]),
            st.sampled_from([700.0, 1_000.0, 2_000.0, 3_600.0, 9_000.0]),
            st.sampled_from([None, 600.0, 1_800.0]),
        ),
        min_size=2,
        max_size=8,
    ),
    st.integers(1, 8),
)
def test_a_reclaim_on_one_node_loses_the_least_work_it_can(
    jobs: list[tuple[int, float, float | None]], need: int
) -> None:
    """Against every set of the node's borrowers that frees the task's GPUs (brute force)."""
    running, first = [], 0
    for i, (gpus, age, interval) in enumerate(jobs):
        gpus = min(gpus, 8 - first)
        if gpus <= 0:
            break
        on = [(1, range(first, first + gpus))]
        running.append(
            run(100 + i, 2, on, preemptible=True, started=-age, checkpoint_interval_s=interval)
        )
        first += gpus
    s = snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=8), org(2)],
        running=running,
        pending=[job(1, 1, need)],
    )
    chosen = {p.job_id for p in schedule(s).preemptions}
    short = need - (8 - first)
    if short <= 0:
        assert not chosen
        return
    kill_at = s.now + s.config.preemption_grace_s
    lost = {r.job_id: r.gpu_count * work_lost_s(r, kill_at) for r in running}
    least = min(
        sum(lost[r.job_id] for r in some)
        for k in range(1, len(running) + 1)
        for some in itertools.combinations(running, k)
        if sum(r.gpu_count for r in some) >= short
    )
    assert sum(lost[j] for j in chosen) == least
