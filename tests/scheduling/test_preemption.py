"""Reclaim: an org takes its guarantee back from a borrower, through the agent, end to end."""

from __future__ import annotations

from sqlalchemy import select

from scheduler.db import Task, UsageRecord
from scheduler.services.invariants import check_invariants
from tests.scheduling.harness import Cluster, report


async def test_reclaim_preempts_the_borrower_and_requeues_it(cluster: Cluster) -> None:
    borrower_org = await cluster.org(guaranteed=0, limit=8)
    owner_org = await cluster.org(guaranteed=8, limit=8)
    borrower = await cluster.user_token(borrower_org)
    owner = await cluster.user_token(owner_org)
    node = await cluster.register(await cluster.join_token(), gpus=8)
    cred = node["credential"]

    lent = await cluster.submit(borrower, gpus_per_node=8, preemptible=True)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], lent["id"], "running")])

    wanted = await cluster.submit(owner, gpus_per_node=8)
    await cluster.cycle()
    reply = await cluster.heartbeat(cred)
    assert reply["start"] == []  # the GPUs are not free until the borrower has stopped
    assert [(s["task_id"], s["reason"]) for s in reply["stop"]] == [(spec["task_id"], "preempt")]
    explain = await cluster.call("GET", f"/v1/jobs/{wanted['id']}/explain", owner)
    assert explain["state"] == "PENDING"

    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], lent["id"], "stopped", signal=15)])
    requeued = await cluster.job(borrower, lent["id"])
    assert requeued["state"] == "PENDING"
    assert requeued["requeue_count"] == 1

    await cluster.cycle()
    reply = await cluster.heartbeat(cred)
    assert [s["job_id"] for s in reply["start"]] == [wanted["id"]]
    assert (await cluster.job(owner, wanted["id"]))["state"] == "STARTING"

    async with cluster.sessionmaker() as session:
        first = await session.get(Task, spec["task_id"])
        assert first is not None
        assert first.state.value == "PREEMPTED"
        flags = set(
            await session.scalars(
                select(UsageRecord.preempted).where(UsageRecord.job_id == lent["id"])
            )
        )
        invariants = await check_invariants(session)
    assert flags == {True}  # the borrower's lost usage is marked as lost to preemption
    assert invariants.ok, invariants.violations
    metrics = (await cluster.http.get("/metrics")).text
    assert 'fairgpu_preemptions_total{reason="reclaim"} 1.0' in metrics
