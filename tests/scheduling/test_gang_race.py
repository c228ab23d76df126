"""Two nodes report the last two tasks of a gang in overlapping transactions: the job still ends.

Found end to end (tests/e2e) on PostgreSQL: under READ COMMITTED each heartbeat saw the other
node's task still running, so neither ended the job and it stayed RUNNING for ever. Starting had
the milder twin: both nodes moved the job STARTING → RUNNING, two events for one change.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from protocol.agent import Heartbeat, TaskReport
from scheduler.services.heartbeat.full import heartbeat
from scheduler.services.scheduling.lifecycle import LifecycleWork, apply_work
from tests.scheduling.harness import Cluster, report


async def test_two_nodes_reporting_at_once_move_the_gang_once(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    join = await cluster.join_token()
    nodes = [await cluster.register(join, gpus=8) for _ in range(2)]
    job = await cluster.submit(token, gpus_per_node=8, nodes=2)
    await cluster.cycle()
    specs = [(await cluster.heartbeat(n["credential"]))["start"][0] for n in nodes]
    settings = cluster.app.state.settings

    async def overlapping(state: str, **kw: Any) -> None:
        """Both nodes report `state`; the second while the first one's transaction is open."""

        def body(i: int) -> Heartbeat:
            task = TaskReport(task_id=specs[i]["task_id"], job_id=job["id"], state=state, **kw)
            return Heartbeat(tasks=[task])

        async with cluster.sessionmaker() as first, cluster.sessionmaker() as second:
            await heartbeat(first, node_id=nodes[0]["node_id"], body=body(0), settings=settings)
            other = asyncio.create_task(
                heartbeat(second, node_id=nodes[1]["node_id"], body=body(1), settings=settings)
            )
            await asyncio.sleep(0.3)
            await first.commit()
            await other
            await second.commit()

    await overlapping("running")
    assert (await cluster.job(token, job["id"]))["state"] == "RUNNING"
    await overlapping("exited", exit_code=0)
    ended = await cluster.job(token, job["id"])
    assert (ended["state"], ended["exit_code"]) == ("COMPLETED", 0)
    events = await cluster.call("GET", f"/v1/jobs/{job['id']}/events", token)
    moves = [(e["from_state"], e["to_state"]) for e in events["data"] if e["kind"] == "job.state"]
    assert moves == [(None, "PENDING"), ("PENDING", "STARTING"), ("STARTING", "RUNNING"),
                     ("RUNNING", "COMPLETED")]  # fmt: skip


async def test_lost_node_and_a_sibling_ending_at_once_end_the_job(cluster: Cluster) -> None:
    """The cycle finds rank 0's node lost while rank 1's exit report is being applied.

    `end_task` takes the job's lock as the heartbeat does, so the cycle reads rank 1 as ended.
    """
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    join = await cluster.join_token()
    nodes = [await cluster.register(join, gpus=8) for _ in range(2)]
    job = await cluster.submit(token, gpus_per_node=8, nodes=2)
    await cluster.cycle()
    specs = [(await cluster.heartbeat(n["credential"]))["start"][0] for n in nodes]
    for spec, node in zip(specs, nodes, strict=True):
        await cluster.heartbeat(
            node["credential"], tasks=[report(spec["task_id"], job["id"], "running")]
        )
    settings = cluster.app.state.settings
    exited = TaskReport(task_id=specs[1]["task_id"], job_id=job["id"], state="exited", exit_code=0)
    later = datetime.now(UTC) + timedelta(seconds=settings.node_timeout_s * 2)
    lost = LifecycleWork(stale_nodes=[nodes[0]["node_id"]])
    async with cluster.sessionmaker() as agent, cluster.sessionmaker() as cycle:
        await heartbeat(
            agent, node_id=nodes[1]["node_id"], body=Heartbeat(tasks=[exited]), settings=settings
        )
        other = asyncio.create_task(apply_work(cycle, lost, now=later, settings=settings))
        await asyncio.sleep(0.3)
        await agent.commit()
        await other
        await cycle.commit()
    ended = await cluster.job(token, job["id"])
    assert ended["state"] == "NODE_FAIL"
