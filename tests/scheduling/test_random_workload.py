"""A seeded random workload through the real app: the DESIGN.md invariants hold throughout."""

from __future__ import annotations

import random
from typing import Any

import pytest

from scheduler.services.invariants import check_invariants
from tests.scheduling.harness import Cluster, report


class FakeAgent:
    """Just enough of an agent: runs what it is told, ends tasks when the test says so."""

    def __init__(self, cluster: Cluster, node: dict[str, Any]) -> None:
        self.cluster = cluster
        self.cred = str(node["credential"])
        self.running: dict[int, int] = {}  # task id → job id
        self.outbox: list[dict[str, Any]] = []

    async def beat(self) -> None:
        reply = await self.cluster.heartbeat(self.cred, tasks=self.outbox)
        self.outbox = [r for r in self.outbox if r["state"] == "running"]
        for stop in reply["stop"]:
            job_id = self.running.pop(stop["task_id"], None)
            if job_id is not None:
                self.outbox = [r for r in self.outbox if r["task_id"] != stop["task_id"]]
                self.outbox.append(report(stop["task_id"], job_id, "stopped", signal=15))
        for spec in reply["start"]:
            if spec["task_id"] not in self.running:
                self.running[spec["task_id"]] = spec["job_id"]
                self.outbox.append(report(spec["task_id"], spec["job_id"], "running"))

    def finish_one(self, rng: random.Random) -> None:
        if not self.running:
            return
        task_id = rng.choice(sorted(self.running))
        job_id = self.running.pop(task_id)
        self.outbox = [r for r in self.outbox if r["task_id"] != task_id]
        self.outbox.append(report(task_id, job_id, "exited", exit_code=rng.choice((0, 0, 1))))


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_workload_keeps_the_invariants(cluster: Cluster, seed: int) -> None:
    rng = random.Random(seed)
    orgs = [await cluster.org(guaranteed=g, limit=12) for g in (4, 4, 0)]
    tokens = [await cluster.user_token(o) for o in orgs]
    join = await cluster.join_token()
    agents = [FakeAgent(cluster, await cluster.register(join, gpus=4)) for _ in range(3)]
    submitted: list[tuple[int, str]] = []
    for _ in range(30):
        action = rng.random()
        if action < 0.4:
            token = rng.choice(tokens)
            job = await cluster.submit(
                token,
                gpus_per_node=rng.choice((1, 2, 4)),
                nodes=rng.choice((1, 1, 2)),
                preemptible=rng.random() < 0.5,
            )
            submitted.append((job["id"], token))
        elif action < 0.7:
            rng.choice(agents).finish_one(rng)
        elif action < 0.8 and submitted:
            job_id, token = rng.choice(submitted)
            await cluster.http.post(
                f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"}
            )
        await cluster.cycle()
        for agent in agents:
            await agent.beat()
        async with cluster.sessionmaker() as session:
            result = await check_invariants(session)
        assert result.ok, result.violations
    states = [(await cluster.job(t, j))["state"] for j, t in submitted]
    assert len(states) == len(submitted)  # every submitted job is still there, in some state
    assert "COMPLETED" in states  # and work got done
