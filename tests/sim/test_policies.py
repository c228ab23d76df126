"""The simulator driving the real scheduling core, on hand-made traces with known answers."""

from __future__ import annotations

import pytest

from scheduler.sim.config import POLICY_NAMES, SimConfig, TimeLimitModel
from scheduler.sim.records import SimResult
from scheduler.sim.runner import make_workload, run_policy
from scheduler.sim.trace import Quota, TraceJob

EXACT = SimConfig(time_limit_model=TimeLimitModel.EXACT)


def by_name(result: SimResult) -> dict[str, tuple[str, float, float, float]]:
    """name -> (outcome, first start, end, wait) for every job."""
    return {j.trace.name: (j.outcome, j.first_start_s, j.end_s, j.wait_s) for j in result.jobs}


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_one_job_starts_on_arrival(policy: str) -> None:
    workload = make_workload([TraceJob("j", "a", 100, 3_600, 4)], [Quota("a", 8)], "1x8")
    result = run_policy(workload, policy, EXACT)
    assert by_name(result) == {"j": ("COMPLETED", 100, 3_700, 0)}


def competing_tenants() -> list[TraceJob]:
    """Tenant a floods the cluster at 0; tenant b asks for its guarantee at 1,000."""
    a = [TraceJob(f"a{i}", "a", 0, 10_000, 1) for i in range(16)]
    b = [TraceJob(f"b{i}", "b", 1_000, 1_000, 1) for i in range(8)]
    return a + b


def test_fairgpu_lends_idle_gpus_and_reclaims_them_within_the_grace() -> None:
    workload = make_workload(competing_tenants(), [Quota("a", 8), Quota("b", 8)], "2x8")
    result = run_policy(workload, "fairgpu", EXACT)
    jobs = by_name(result)
    assert all(jobs[f"a{i}"][1] == 0 for i in range(16))  # a borrows b's idle half at once
    # b's jobs wait exactly the preemption grace: 8 of a's jobs are killed at 1,030.
    assert {jobs[f"b{i}"] for i in range(8)} == {("COMPLETED", 1_030, 2_030, 30)}
    victims = [j for j in result.jobs if j.preemptions]
    assert len(victims) == 8
    # No checkpoint yet after 1,030 s: each loses all of it and reruns in full from 2,030.
    assert {(j.lost_gpu_s, j.end_s) for j in victims} == {(1_030, 12_030)}


@pytest.mark.parametrize("policy", ["fifo", "slurm-like"])
def test_hard_guarantees_keep_the_idle_half_idle(policy: str) -> None:
    workload = make_workload(competing_tenants(), [Quota("a", 8), Quota("b", 8)], "2x8")
    jobs = by_name(run_policy(workload, policy, EXACT))
    assert sorted(jobs[f"a{i}"][1] for i in range(16)) == [0] * 8 + [10_000] * 8
    assert {jobs[f"b{i}"] for i in range(8)} == {("COMPLETED", 1_000, 2_000, 0)}


def gang_behind_small_jobs() -> list[TraceJob]:
    """A 12-GPU gang (2 x 6) that cannot fit while four 1-GPU jobs hold one node's GPUs."""
    return [
        *(TraceJob(f"s{i}", "a", 0, 1_000, 1) for i in range(4)),
        TraceJob("gang", "a", 10, 500, 12),
        *(TraceJob(f"b{i}", "a", 20, 100, 1) for i in range(4)),
        TraceJob("big8", "a", 25, 3_000, 8),  # would delay the gang to 3,025 if started early
    ]


@pytest.mark.parametrize(
    # Backfill starts the small jobs at their arrival's cycle (20), FIFO behind the gang.
    ("policy", "small_start"),
    [("fairgpu", 20), ("slurm-like", 20), ("fifo", 1_000)],
)
def test_gang_is_not_starved_and_backfill_only_uses_the_gap(
    policy: str, small_start: float
) -> None:
    workload = make_workload(gang_behind_small_jobs(), [Quota("a", 16)], "2x8")
    jobs = by_name(run_policy(workload, policy, EXACT))
    assert jobs["gang"] == ("COMPLETED", 1_000, 1_500, 990)
    assert jobs["big8"] == ("COMPLETED", 1_500, 4_500, 1_475)
    assert {jobs[f"b{i}"][1] for i in range(4)} == {small_start}
