"""A node's credential speaks for its own node only, on both ways a heartbeat arrives.

A hostile node (or whoever stole its credential) reports another node's task as ended, writes
log lines into it, claims its GPUs, names another node in the body, and keeps heartbeating once
its credential is revoked or has expired. None of it may reach the other node's tasks, GPUs or
jobs. Each scenario runs with the direct routes on and off (api/direct.py answers quiet
heartbeats before routing on PostgreSQL; on SQLite every heartbeat is routed), since both go
through the one entry point `Heartbeats.answer`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from scheduler.db import ApiToken, Gpu, Task
from scheduler.metrics import PROCESS_REGISTRY
from tests.scheduling.harness import Cluster, fast_settings, now, report, running_cluster, sample

pytestmark = pytest.mark.parametrize("direct", [True, False], ids=["direct", "routed"])


def _answered_directly() -> float:
    value = PROCESS_REGISTRY.get_sample_value(
        "fairgpu_api_hot_path_requests_total", {"route": "heartbeat", "outcome": "answered"}
    )
    return value or 0.0


async def _running_job(cluster: Cluster, node: dict[str, Any]) -> tuple[str, int, int]:
    """(user token, job id, task id) of one org's job running on `node`."""
    org = await cluster.org(guaranteed=2)
    token = await cluster.user_token(org)
    job = await cluster.submit(token, gpus_per_node=1, name="victim")
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(node["credential"]))["start"]
    assert spec["job_id"] == job["id"]
    await cluster.heartbeat(
        node["credential"], tasks=[report(spec["task_id"], job["id"], "running")]
    )
    return token, job["id"], spec["task_id"]


def _samples(node: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    at = now()
    return [sample(i, uuid, at, **kw) for i, uuid in enumerate(node["gpu_uuids"])]


async def test_a_node_cannot_touch_another_nodes_tasks_or_gpus(
    database_url: str, direct: bool
) -> None:
    async with running_cluster(fast_settings(database_url, hot_paths=direct)) as cluster:
        join = await cluster.join_token()
        victim = await cluster.register(join, gpus=2)
        intruder = await cluster.register(join, gpus=2)
        token, job_id, task_id = await _running_job(cluster, victim)
        cred = intruder["credential"]
        before = _answered_directly()
        # A quiet-looking heartbeat that reports the other node's task as its own running one:
        # the task is unknown here, so the intruder is told to stop it, nothing else.
        reply = await cluster.heartbeat(cred, tasks=[report(task_id, job_id, "running")])
        assert [s["task_id"] for s in reply["stop"]] == [task_id]
        assert reply["start"] == []
        # Ending it, with forged output; claiming the victim's GPUs (its uuids, at the same
        # indices) as failed ones.
        forged = "forged-by-the-intruder"
        await cluster.heartbeat(
            cred,
            tasks=[report(task_id, job_id, "exited", exit_code=0)],
            logs=[{"task_id": task_id, "offset": 0, "next_offset": len(forged), "data": forged}],
            samples=_samples(victim, health="unhealthy", health_reason="xid 79"),
        )
        await cluster.heartbeat(cred, tasks=[report(task_id, job_id, "lost")])
        # Naming the other node in the body is not part of the protocol.
        await cluster.call(
            "POST", "/v1/agent/heartbeat", cred, {"node_id": victim["node_id"]}, expect=422
        )
        # A quiet heartbeat of its own is answered as usual (directly on PostgreSQL).
        for _ in range(2):
            quiet = await cluster.heartbeat(cred, samples=_samples(intruder))
            assert quiet["start"] == quiet["stop"] == []
        if direct and "postgresql" in database_url:
            assert _answered_directly() > before
        job = await cluster.job(token, job_id)
        assert job["state"] == "RUNNING", job
        assert job["exit_code"] is None
        logs = await cluster.call("GET", f"/v1/jobs/{job_id}/logs", token)
        assert forged not in logs["data"]
        async with cluster.sessionmaker() as session:
            task = await session.get(Task, task_id)
            assert task is not None
            assert (task.node_id, task.log_bytes) == (victim["node_id"], 0)
            health = (
                await session.scalars(select(Gpu.health).where(Gpu.node_id == victim["node_id"]))
            ).all()
        assert {str(h) for h in health} == {"healthy"}
        # The victim's own reports still count: its task ends as it says.
        await cluster.heartbeat(
            victim["credential"], tasks=[report(task_id, job_id, "exited", exit_code=3)]
        )
        assert (await cluster.job(token, job_id))["state"] == "FAILED"


async def test_a_revoked_or_expired_node_credential_is_refused_on_every_path(
    database_url: str, direct: bool
) -> None:
    async with running_cluster(fast_settings(database_url, hot_paths=direct)) as cluster:
        join = await cluster.join_token()
        expiring = await cluster.register(join, gpus=1)
        revoked = await cluster.register(join, gpus=1)
        for node in (expiring, revoked):  # known to the process: quiet from now on
            for _ in range(2):
                await cluster.heartbeat(node["credential"], samples=_samples(node))
        async with cluster.sessionmaker() as session:
            await session.execute(
                update(ApiToken)
                .where(ApiToken.node_id == expiring["node_id"])
                .values(expires_at=now() - timedelta(seconds=1))
            )
            await session.commit()
        cluster.app.state.auth_cache.clear()
        await cluster.call(
            "POST", f"/v1/nodes/{revoked['node_id']}/revoke", cluster.admin, expect=200
        )
        for node in (expiring, revoked):
            cred = node["credential"]
            for body in ({}, {"samples": _samples(node)}, {"wait_s": 2}):
                await cluster.call("POST", "/v1/agent/heartbeat", cred, body, expect=401)
            # Nor can it re-register itself, under its own name or a new one.
            name = node["node_name"]
            for wanted in (name, f"{name}-again"):
                body = {
                    "name": wanted, "site": "dc1", "domain": "rack1", "hostname": wanted,
                    "address": "10.0.0.9", "agent_version": "test",
                    "gpus": [{"index": 0, "uuid": f"GPU-{wanted}-x", "model": "H100",
                              "memory_bytes": 1}],
                }  # fmt: skip
                await cluster.call("POST", "/v1/agent/register", cred, body, expect=401)


async def test_one_credential_holds_at_most_two_long_polls(database_url: str, direct: bool) -> None:
    """Every held long poll reads the database when its node is woken: a stolen credential
    holding hundreds would turn each wake-up into hundreds of reads. An agent holds one (two
    across a restart); beyond, a heartbeat is answered at once, as without `wait_s`."""
    settings = fast_settings(database_url, hot_paths=direct, heartbeat_long_poll_s=30.0)
    async with running_cluster(settings) as cluster:
        node = await cluster.register(await cluster.join_token(), gpus=1)
        cred = node["credential"]
        for _ in range(2):
            await cluster.heartbeat(cred, samples=_samples(node))
        headers = {"Authorization": f"Bearer {cred}"}
        polls = [
            asyncio.create_task(
                cluster.http.post(
                    "/v1/agent/heartbeat",
                    json={"wait_s": 30, "samples": _samples(node)},
                    headers=headers,
                )
            )
            for _ in range(6)
        ]
        answered: set[asyncio.Task[Any]] = set()
        while len(answered) < 4:
            done, _ = await asyncio.wait(
                [p for p in polls if p not in answered],
                timeout=15,
                return_when=asyncio.FIRST_COMPLETED,
            )
            assert done, "heartbeats beyond the second long poll were held"
            answered |= done
        assert all(p.result().status_code == 200 for p in answered)
        assert len([p for p in polls if not p.done()]) == 2
        assert cluster.app.state.heartbeats.long_polls_held(node["node_id"]) == 2
        await cluster.call("POST", f"/v1/nodes/{node['node_id']}/revoke", cluster.admin)
        held = await asyncio.wait_for(asyncio.gather(*polls), 10)
        assert sorted(r.status_code for r in held) == [200, 200, 200, 200, 401, 401]
