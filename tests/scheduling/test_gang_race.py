"""Two nodes report the last two tasks of a gang in overlapping transactions: the job still ends.

Found end to end (tests/e2e) on PostgreSQL: under READ COMMITTED each heartbeat saw the other
node's task still running, so neither ended the job and it stayed RUNNING for ever.
"""

from __future__ import annotations

import asyncio

from api.schemas.agent import Heartbeat, TaskReport
from scheduler.services.agents import heartbeat
from tests.scheduling.harness import Cluster, report


async def test_last_two_tasks_ending_at_once_end_the_job(cluster: Cluster) -> None:
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
    assert (await cluster.job(token, job["id"]))["state"] == "RUNNING"

    settings = cluster.app.state.settings

    def exited(i: int) -> Heartbeat:
        return Heartbeat(
            tasks=[TaskReport(task_id=specs[i]["task_id"], job_id=job["id"], state="exited",
                              exit_code=0)]
        )  # fmt: skip

    async with cluster.sessionmaker() as first, cluster.sessionmaker() as second:
        await heartbeat(first, node_id=nodes[0]["node_id"], body=exited(0), settings=settings)
        # The second node's report arrives while the first one's transaction is still open.
        other = asyncio.create_task(
            heartbeat(second, node_id=nodes[1]["node_id"], body=exited(1), settings=settings)
        )
        await asyncio.sleep(0.3)
        await first.commit()
        await other
        await second.commit()
    ended = await cluster.job(token, job["id"])
    assert (ended["state"], ended["exit_code"]) == ("COMPLETED", 0)
