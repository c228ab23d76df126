"""A reclaim that cannot free its gang is known from sums, before any victim is ordered (#18).

`Preemptor._could_free` answers "could a plan exist?" from GPUs per node; `plan` then builds,
orders and costs the candidates only when the answer is yes. The answer must be exact: the
property below runs every plan in full beside it and compares.
"""

from __future__ import annotations

from dataclasses import replace
from unittest.mock import patch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core import Scheduler
from scheduler.core.capacity import Layout
from scheduler.core.cycle import Cycle
from scheduler.core.preempt import Plan, Preemptor
from scheduler.core.types import PendingJob, Snapshot
from tests.core.builder import job, nodes, org, run, snapshot
from tests.core.golden import digest
from tests.core.test_properties import advance, snapshots

HOUR_S = 3_600.0


def _one_node_nobody_can_free() -> Snapshot:
    # Org 1's 8-GPU job is in quota. Node 1 holds org 2's borrower (4 GPUs, past the minimum
    # runtime: a victim) and org 3's job inside org 3's guarantee (not one): at most 4 GPUs
    # could be freed there, and there is no other node.
    return snapshot(
        nodes=nodes(1),
        orgs=[org(1, guaranteed=8), org(2), org(3, guaranteed=4)],
        running=[
            run(100, 2, [(1, range(4))], preemptible=True, started=-HOUR_S),
            run(101, 3, [(1, range(4, 8))], preemptible=True, started=-HOUR_S),
        ],
        pending=[job(1, 1, 8)],
    )


def test_a_reclaim_that_cannot_free_the_gang_orders_no_candidate() -> None:
    s = _one_node_nobody_can_free()
    asked: list[str] = []
    real = Preemptor.candidates

    def noting(self: Preemptor, gpu_type: str) -> object:
        asked.append(gpu_type)
        return real(self, gpu_type)

    with patch.object(Preemptor, "candidates", noting):
        cycle = Cycle(s, Layout(s.nodes))
        d = cycle.run()
    assert d.preemptions == ()
    assert d.starts == ()
    assert asked == []  # no candidate list was built, ordered or costed
    # The failure is remembered for the rest of the cycle, as a full plan's would be.
    assert [(memo[:3], k) for memo, k in cycle.pre.failed.items()] == [(("H100", None, 8), 1)]
    # With the other org's job gone the same reclaim goes ahead, through the full plan.
    freed = Snapshot(s.now, s.nodes, s.orgs, s.running[:1], s.pending, s.config)
    with patch.object(Preemptor, "candidates", noting):
        d = Cycle(freed, Layout(freed.nodes)).run()
    assert [p.job_id for p in d.preemptions] == [100]
    assert asked == ["H100"]


def _chain(snap: Snapshot, step_s: float, cycles: int = 4) -> list[str]:
    kept = Scheduler()
    out = []
    s = snap
    for _ in range(cycles):
        d = kept.schedule(s)
        out.append(digest(d))
        s = advance(s, d, step_s)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.sampled_from([40.0, 700.0]))
def test_the_shortcuts_answer_as_the_full_plan(snap: Snapshot, step_s: float) -> None:
    """Every reclaim plan runs in full beside the shortcuts' answers: the sums say no exactly
    when the plan finds nothing, and a plan from leaving GPUs alone is the full plan; and the
    decisions (explanations and standings included) are the same over a chain of cycles
    whether the shortcuts may answer or not."""
    could: list[bool] = []
    leaving: list[Plan | None] = []
    compared: list[tuple[bool, Plan | None, Plan | None]] = []
    real_could_free, real_leaving_only, real_plan = (
        Preemptor._could_free,
        Preemptor._leaving_only,
        Preemptor.plan,
    )

    def could_noting(self: Preemptor, job: PendingJob, gpu_type: str, need: int) -> bool:
        could.append(real_could_free(self, job, gpu_type, need))
        return True

    def leaving_noting(self: Preemptor, job: PendingJob, gpu_type: str, need: int) -> Plan | None:
        # A gang's plan may take nodes from the free index: only single tasks are compared.
        leaving.append(real_leaving_only(self, job, gpu_type, need) if job.nodes == 1 else None)
        return None

    def plan_noting(
        self: Preemptor,
        job: PendingJob,
        gpu_type: str,
        in_quota: bool,
        consolidate: bool = False,
        spare_org: int = -1,
    ) -> Plan | None:
        asked = len(could)
        got = real_plan(self, job, gpu_type, in_quota, consolidate, spare_org)
        if len(could) > asked:
            compared.append((could[-1], leaving[-1], got))
        return got

    with (
        patch.object(Preemptor, "_could_free", could_noting),
        patch.object(Preemptor, "_leaving_only", leaving_noting),
        patch.object(Preemptor, "plan", plan_noting),
    ):
        full = _chain(snap, step_s)
    for could_free, from_leaving, found in compared:
        assert could_free == (found is not None)
        if from_leaving is not None:
            assert from_leaving == found
    assert _chain(snap, step_s) == full


def test_a_borrower_no_candidate_is_below_reads_no_candidates() -> None:
    # Org 1 borrows (no guarantee) and finds no idle GPU; its own job on the node is a
    # candidate of the same class: nothing to bump, known from the candidates' classes alone.
    same = snapshot(
        nodes=nodes(1),
        orgs=[org(1), org(2)],
        running=[run(100, 1, [(1, range(8))], preemptible=True, started=-HOUR_S)],
        pending=[job(1, 1, 8, preemptible=True)],
    )
    read: list[tuple[int, str]] = []
    real = Preemptor._stat

    def noting(self: Preemptor, key: tuple[int, str]) -> list[int] | None:
        read.append(key)
        return real(self, key)

    with patch.object(Preemptor, "_stat", noting):
        d = Scheduler().schedule(same)
    assert d.preemptions == ()
    assert read == []
    # A lower class among its candidates: the bump reads them and takes that job.
    low = replace(same, running=(replace(same.running[0], priority_class="low"),))
    with patch.object(Preemptor, "_stat", noting):
        d = Scheduler().schedule(low)
    assert [p.job_id for p in d.preemptions] == [100]
    assert read


def test_a_job_waiting_for_leaving_gpus_orders_no_candidate() -> None:
    # Org 1's in-quota job waits for node 1, which an earlier reclaim is emptying; node 2 runs
    # another borrower that could be taken but need not be.
    s = snapshot(
        nodes=nodes(2),
        orgs=[org(1, guaranteed=8), org(2)],
        running=[
            run(100, 2, [(1, range(8))], preemptible=True, preempting=True, preempt_deadline=20.0),
            run(101, 2, [(2, range(8))], preemptible=True, started=-HOUR_S),
        ],
        pending=[job(1, 1, 8)],
    )
    asked: list[str] = []
    real = Preemptor.candidates

    def noting(self: Preemptor, gpu_type: str) -> object:
        asked.append(gpu_type)
        return real(self, gpu_type)

    with patch.object(Preemptor, "candidates", noting):
        d = Scheduler().schedule(s)
    assert d.preemptions == ()
    assert d.starts == ()
    assert asked == []
    assert d.pending[1].estimated_start == 20.0
