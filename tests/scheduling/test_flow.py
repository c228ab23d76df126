"""The whole path through the real app: admin → org → quota → user → submit → agent → usage."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from scheduler.db import UsageRecord
from scheduler.services.invariants import check_invariants
from tests.scheduling.harness import Cluster, now, report, sample


async def test_submit_run_complete_and_usage(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8, limit=8)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=8)
    cred = node["credential"]
    assert (await cluster.heartbeat(cred))["start"] == []

    job = await cluster.submit(token, gpus_per_node=2, env={"A": "1"})
    await cluster.cycle()
    assert (await cluster.job(token, job["id"]))["state"] == "STARTING"

    reply = await cluster.heartbeat(cred)
    (spec,) = reply["start"]
    assert spec["job_id"] == job["id"]
    assert len(spec["gpus"]) == 2
    assert spec["num_nodes"] == 1
    assert spec["env"] == {"A": "1", "FAIRGPU_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": "0"}
    assert spec["org"] == org
    # Until the agent reports the task, every reply repeats the start.
    assert [s["task_id"] for s in (await cluster.heartbeat(cred))["start"]] == [spec["task_id"]]

    t0 = now()
    uuids = [node["gpu_uuids"][i] for i in spec["gpus"]]
    samples0 = [
        sample(i, u, t0, utilization_ratio=1.0, energy_joules=1000.0)
        for i, u in zip(spec["gpus"], uuids, strict=True)
    ]
    reply = await cluster.heartbeat(
        cred,
        tasks=[report(spec["task_id"], job["id"], "running", started_at=t0.isoformat())],
        samples=samples0,
    )
    assert reply["start"] == []
    assert reply["stop"] == []
    assert (await cluster.job(token, job["id"]))["state"] == "RUNNING"

    t1 = t0 + timedelta(seconds=10)
    samples1 = [
        sample(i, u, t1, utilization_ratio=0.5, energy_joules=3000.0)
        for i, u in zip(spec["gpus"], uuids, strict=True)
    ]
    logs = [{"task_id": spec["task_id"], "offset": 0, "next_offset": 6, "data": "hello\n"}]
    done = report(spec["task_id"], job["id"], "exited", exit_code=0, ended_at=now().isoformat())
    await cluster.heartbeat(cred, tasks=[done], samples=samples1, logs=logs)
    # A resent final report and log chunk (reply lost) change nothing.
    await cluster.heartbeat(cred, tasks=[done], logs=logs)
    finished = await cluster.job(token, job["id"])
    assert finished["state"] == "COMPLETED"

    logs_reply = await cluster.call("GET", f"/v1/jobs/{job['id']}/logs", token)
    assert "hello" in str(logs_reply)

    async with cluster.sessionmaker() as session:
        rows = list(await session.scalars(select(UsageRecord)))
        report_ = await check_invariants(session)
    assert report_.ok, report_.violations
    assert sum(r.gpu_seconds_allocated for r in rows) > 0
    assert abs(sum(r.gpu_seconds_busy for r in rows) - 2 * 10 * 0.5) < 1e-6
    assert abs(sum(r.energy_joules for r in rows) - 2 * 2000.0) < 1e-6

    usage = await cluster.call("GET", f"/v1/usage?org={org}&by=org", cluster.admin)
    allocated_h = sum(line["gpu_hours_allocated"] for line in usage["data"])
    assert abs(allocated_h * 3600 - sum(r.gpu_seconds_allocated for r in rows)) < 1e-3
