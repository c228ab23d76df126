"""The event loop's job model, checked with test-double schedulers so the answers are exact."""

from __future__ import annotations

import random

import pytest

from scheduler.core import Scheduler, schedule
from scheduler.core.running import RunningTables
from scheduler.core.types import Decisions, Placement, Preemption, PreemptionReason, Snapshot, Start
from scheduler.sim.config import SimConfig, TimeLimitModel
from scheduler.sim.metrics import summarize
from scheduler.sim.records import SimulationError
from scheduler.sim.runner import make_workload, run_policy
from scheduler.sim.trace import Quota, TraceJob
from tests.core.golden import digest
from tests.core.test_running import tables
from tests.sim.greedy import greedy

ONE_NODE = "1x8"


def test_one_job_runs_at_once_for_its_duration() -> None:
    workload = make_workload([TraceJob("j", "a", 100, 3_600, 4)], [Quota("a", 8)], ONE_NODE)
    result = run_policy(workload, "fairgpu", SimConfig(), schedule=greedy)
    (job,) = result.jobs
    assert (job.outcome, job.first_start_s, job.end_s, job.wait_s) == ("COMPLETED", 100, 3_700, 0)
    summary, _ = summarize(result, bucket_s=300, grace_s=30)
    assert summary["tenants"]["a"]["received_gpu_h"] == 4.0
    assert summary["allocation"]["overall_ratio"] == pytest.approx(
        4 * 3_600 / (8 * 3_700), abs=1e-3
    )
    assert summary["makespan_s"] == 3_700


def test_job_beyond_its_time_limit_ends_as_timeout() -> None:
    config = SimConfig(time_limit_model=TimeLimitModel.FACTOR, time_limit_factor=0.5)
    workload = make_workload([TraceJob("j", "a", 0, 1_000, 1)], [Quota("a", 8)], ONE_NODE)
    (job,) = run_policy(workload, "fairgpu", config, schedule=greedy).jobs
    assert (job.outcome, job.end_s) == ("TIMEOUT", 500)


def test_job_no_node_can_hold_is_set_aside() -> None:
    workload = make_workload([TraceJob("j", "a", 0, 10, 16)], [Quota("a", 8)], ONE_NODE)
    (job,) = run_policy(workload, "fairgpu", SimConfig(), schedule=greedy).jobs
    assert job.outcome == "UNSCHEDULABLE"


def newest_first_with_preemption(snapshot: Snapshot) -> Decisions:
    """Starts the newest pending job on an idle node; a newer job preempts the running one."""
    if snapshot.running:
        victim = snapshot.running[0]
        newer = [p for p in snapshot.pending if p.job_id > victim.job_id]
        if newer and not victim.preempting:
            deadline = snapshot.now + 30
            return Decisions(
                preemptions=(
                    Preemption(victim.job_id, PreemptionReason.RECLAIM, newer[0].job_id, deadline),
                )
            )
        return Decisions()
    if not snapshot.pending:
        return Decisions()
    job = max(snapshot.pending, key=lambda p: p.job_id)
    return Decisions(starts=(Start(job.job_id, (Placement(1, tuple(range(8))),)),))


def test_preempted_job_loses_work_since_checkpoint_and_is_requeued() -> None:
    trace = [TraceJob("long", "a", 0, 4_000, 8), TraceJob("short", "b", 2_000, 100, 8)]
    workload = make_workload(trace, [Quota("a", 8), Quota("b", 8)], ONE_NODE)
    config = SimConfig(checkpoint_interval_s=1_800)
    result = run_policy(workload, "fairgpu", config, schedule=newest_first_with_preemption)
    long, short = result.jobs
    # Killed at 2,030 after 2,030 s: keeps 1,800 s, loses 230 s on 8 GPUs, 2,200 s to go.
    assert (short.first_start_s, short.end_s, short.wait_s) == (2_030, 2_130, 30)
    assert (long.preemptions, long.lost_gpu_s, long.end_s) == (1, 230 * 8, 2_130 + 2_200)
    assert long.wait_s == 100
    summary, _ = summarize(result, bucket_s=300, grace_s=30)
    # Delivered: 8 GPUs for 2,030 + 100 + 2,200 s, of which the 230 s lost.
    assert summary["preemptions"] == {
        "count": 1,
        "jobs_preempted": 1,
        "gpu_hours_lost": 0.51,
        "gpu_hours_delivered": round(8 * 4_330 / 3_600, 2),
        "lost_over_delivered": round(230 / 4_330, 6),
    }


def double_booker(snapshot: Snapshot) -> Decisions:
    return Decisions(starts=tuple(Start(p.job_id, (Placement(1, (0,)),)) for p in snapshot.pending))


def test_a_gpu_given_twice_stops_the_simulation() -> None:
    trace = [TraceJob("x", "a", 0, 10, 1), TraceJob("y", "a", 0, 10, 1)]
    workload = make_workload(trace, [Quota("a", 8)], ONE_NODE)
    with pytest.raises(SimulationError, match="twice"):
        run_policy(workload, "fairgpu", SimConfig(), schedule=double_booker)


def test_the_kept_scheduler_follows_the_simulators_changes() -> None:
    """The simulator tells its kept `Scheduler` which jobs started, ended or were sent a
    preemption since the last cycle: every cycle then decides as one that keeps nothing, the
    running-job tables equal tables built from every running job, and only the first cycle
    reads them all. Busy on purpose: lending, reclaim and preemptions of preemptible borrowers."""
    rng = random.Random(7)
    trace = [
        TraceJob(
            f"j{i}",
            rng.choice("abc"),
            rng.uniform(0, 40_000),
            rng.uniform(60, 9_000),
            rng.choice([1, 1, 2, 4, 8, 16]),
        )
        for i in range(400)
    ]
    quotas = [Quota("a", 16), Quota("b", 8), Quota("c", 0)]
    workload = make_workload(trace, quotas, "4x8")
    kept = Scheduler()
    cycles = 0

    def checked(snapshot: Snapshot) -> Decisions:
        nonlocal cycles
        cycles += 1
        decisions = kept.schedule(snapshot)
        assert digest(decisions) == digest(schedule(snapshot))
        run = kept._run
        assert run is not None
        fresh = RunningTables(snapshot.running, snapshot.now, snapshot.config.min_runtime_s)
        assert tables(run) == tables(fresh)
        return decisions

    config = SimConfig(preemptible=True, cycle_interval_s=1.0)
    result = run_policy(workload, "fairgpu", config, schedule=checked)
    plain = run_policy(workload, "fairgpu", config, schedule=schedule)
    assert [(j.outcome, j.first_start_s, j.end_s, j.preemptions) for j in result.jobs] == [
        (j.outcome, j.first_start_s, j.end_s, j.preemptions) for j in plain.jobs
    ]
    assert result.stats.preemptions_sent > 0
    assert (kept.running_built, kept.running_advanced) == (1, cycles - 1)
