"""Invariants of any simulated run, whatever the trace and policy (property tests)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.sim.config import POLICY_NAMES, SimConfig
from scheduler.sim.metrics import summarize
from scheduler.sim.runner import make_workload, run_policy
from scheduler.sim.trace import Quota, TraceJob

jobs = st.lists(
    st.builds(
        TraceJob,
        name=st.just("j"),
        tenant=st.sampled_from(["a", "b"]),
        submit_time_s=st.integers(min_value=0, max_value=20_000).map(float),
        duration_s=st.integers(min_value=1, max_value=20_000).map(float),
        num_gpus=st.sampled_from([1, 2, 4, 8, 16]),
    ),
    min_size=1,
    max_size=25,
).map(lambda js: sorted(js, key=lambda j: j.submit_time_s))


@pytest.mark.parametrize("policy", POLICY_NAMES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=jobs)
def test_every_job_is_accounted_for(policy: str, trace: list[TraceJob]) -> None:
    workload = make_workload(trace, [Quota("a", 16), Quota("b", 16)], "4x8/2")
    config = SimConfig(checkpoint_interval_s=600)
    result = run_policy(workload, policy, config)
    held_gpu_s = 0.0
    for job in result.jobs:
        if job.outcome == "UNSCHEDULABLE":  # only hard limits refuse a 16-GPU job of a tenant
            assert policy != "fairgpu"
            continue
        assert job.outcome == "COMPLETED"
        # Time from submit to end is spent either waiting or holding GPUs, nothing else.
        jct = job.end_s - job.trace.submit_time_s
        assert jct == pytest.approx(job.wait_s + job.run_s)
        # Holding time is the work plus what preemptions threw away.
        assert job.run_s * job.gpus == pytest.approx(
            job.trace.duration_s * job.gpus + job.lost_gpu_s
        )
        held_gpu_s += job.run_s * job.gpus
    summary, _ = summarize(result, bucket_s=300, grace_s=30)
    received_gpu_h = sum(t["received_gpu_h"] for t in summary["tenants"].values())
    assert received_gpu_h == pytest.approx(held_gpu_s / 3_600, abs=0.01 * len(trace))
    if policy != "fairgpu":
        assert summary["preemptions"]["count"] == 0
