"""A reclaim that cannot free its gang is known from sums, before any victim is ordered (#18).

`Preemptor._could_free` answers "could a plan exist?" from GPUs per node; `plan` then builds,
orders and costs the candidates only when the answer is yes. The answer must be exact: the
property below runs every plan in full beside it and compares.
"""

from __future__ import annotations

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
def test_the_sums_say_no_exactly_when_the_full_plan_fails(snap: Snapshot, step_s: float) -> None:
    """Every reclaim plan runs in full beside the sums' answer: "no" exactly when the plan
    finds nothing, and the decisions (explanations and standings included) are the same over
    a chain of cycles whether the sums may stop a plan or not."""
    answers: list[bool] = []
    compared: list[tuple[bool, bool]] = []
    real_could_free, real_plan = Preemptor._could_free, Preemptor.plan

    def always_full(self: Preemptor, job: PendingJob, gpu_type: str, need: int) -> bool:
        answers.append(real_could_free(self, job, gpu_type, need))
        return True

    def plan_noting(
        self: Preemptor,
        job: PendingJob,
        gpu_type: str,
        in_quota: bool,
        consolidate: bool = False,
        spare_org: int = -1,
    ) -> Plan | None:
        asked = len(answers)
        got = real_plan(self, job, gpu_type, in_quota, consolidate, spare_org)
        if len(answers) > asked:
            compared.append((answers[-1], got is not None))
        return got

    with (
        patch.object(Preemptor, "_could_free", always_full),
        patch.object(Preemptor, "plan", plan_noting),
    ):
        full = _chain(snap, step_s)
    assert all(could == found for could, found in compared), compared
    assert _chain(snap, step_s) == full
