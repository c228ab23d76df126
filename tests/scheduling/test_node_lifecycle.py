"""A node that stops reporting: NODE_FAIL, requeue of preemptible jobs, stale tasks on return."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from scheduler.db import Node, Task
from scheduler.services.invariants import check_invariants
from scheduler.states import NodeState
from tests.scheduling.harness import fast_settings, report, running_cluster


async def test_node_timeout_fails_or_requeues_its_jobs(database_url: str) -> None:
    settings = fast_settings(database_url, node_timeout_s=1.0)
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=2)
        token = await cluster.user_token(org)
        node = await cluster.register(await cluster.join_token(), gpus=2)
        cred = node["credential"]
        keep = await cluster.submit(token, gpus_per_node=1, preemptible=True)
        lose = await cluster.submit(token, gpus_per_node=1)
        await cluster.cycle()
        specs = {s["job_id"]: s for s in (await cluster.heartbeat(cred))["start"]}
        assert set(specs) == {keep["id"], lose["id"]}
        old = [report(s["task_id"], job_id, "running") for job_id, s in specs.items()]
        await cluster.heartbeat(cred, tasks=old)

        for _ in range(50):  # no heartbeats: the node times out
            await asyncio.sleep(0.1)
            if (await cluster.job(token, lose["id"]))["state"] == "NODE_FAIL":
                break
        assert (await cluster.job(token, lose["id"]))["state"] == "NODE_FAIL"
        requeued = await cluster.job(token, keep["id"])
        assert requeued["state"] in ("PENDING", "STARTING")
        assert requeued["requeue_count"] == 1
        async with cluster.sessionmaker() as session:
            down = await session.scalar(select(Node.state).where(Node.id == node["node_id"]))
            invariants = await check_invariants(session)
        assert down is NodeState.DOWN
        assert invariants.ok, invariants.violations

        # The node comes back still running the old tasks: they are stopped as stale, and the
        # requeued job gets a new task (its next attempt).
        reply = await cluster.heartbeat(cred, tasks=old)
        stale = {s["task_id"] for s in reply["stop"] if s["reason"] == "stale"}
        assert stale == {s["task_id"] for s in specs.values()}
        await cluster.cycle()
        reply = await cluster.heartbeat(cred)
        (again,) = reply["start"]
        assert again["job_id"] == keep["id"]
        assert again["task_id"] != specs[keep["id"]]["task_id"]
        async with cluster.sessionmaker() as session:
            task = await session.get(Task, again["task_id"])
            assert task is not None
            assert task.attempt == 1
            assert (
                await session.scalar(select(Node.state).where(Node.id == node["node_id"]))
                is NodeState.READY
            )
