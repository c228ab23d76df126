"""A node that stops reporting: NODE_FAIL, requeue of preemptible jobs, stale tasks on return."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from protocol.states import JobState
from scheduler.db import Node, Task
from scheduler.db.engine import make_sessionmaker
from scheduler.policysettings import PolicySettings
from scheduler.services.invariants import check_invariants
from scheduler.services.scheduling import lifecycle
from scheduler.settings import Settings
from scheduler.states import NodeState
from tests import factories
from tests.scheduling.harness import Cluster, fast_settings, report, running_cluster

SILENT_SETTINGS = {"node_timeout_s": 30.0, "heartbeat_flush_interval_s": 0.0}


async def fall_silent(cluster: Cluster, node_id: int, token: str, job_id: int) -> None:
    """The node stops reporting, until `job_id` (which ran there) has ended NODE_FAIL.

    Its last heartbeat is moved past the timeout rather than waited out: on a loaded machine a
    short timeout ran out during a test's set-up. SILENT_SETTINGS writes every heartbeat at once,
    so no buffered heartbeat can move it forward again.
    """
    async with cluster.sessionmaker() as session:
        row = await session.get(Node, node_id)
        assert row is not None
        row.last_heartbeat_at = datetime.now(UTC) - timedelta(seconds=31)
        await session.commit()
    for _ in range(50):
        await cluster.cycle()
        if (await cluster.job(token, job_id))["state"] == "NODE_FAIL":
            return


async def test_node_timeout_fails_or_requeues_its_jobs(database_url: str) -> None:
    settings = fast_settings(database_url, **SILENT_SETTINGS)
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

        await fall_silent(cluster, node["node_id"], token, lose["id"])
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


async def test_draining_node_becomes_drained_when_empty(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=8)
    cred = node["credential"]
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], job["id"], "running")])
    await cluster.call("POST", f"/v1/nodes/{node['node_id']}/drain", cluster.admin, {})
    later = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    assert await _node_state(cluster, node["node_id"]) is NodeState.DRAINING
    assert (await cluster.job(token, later["id"]))["state"] == "PENDING"  # no new work
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], job["id"], "exited", exit_code=0)])
    await cluster.cycle()
    assert await _node_state(cluster, node["node_id"]) is NodeState.DRAINED


async def test_server_stops_a_task_past_its_time_limit(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=8)
    cred = node["credential"]
    job = await cluster.submit(token, gpus_per_node=1, time_limit=60)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], job["id"], "running")])
    async with cluster.sessionmaker() as session:  # it started long ago, as the agent says
        task = await session.get(Task, spec["task_id"])
        assert task is not None
        assert task.started_at is not None
        task.started_at = task.started_at - timedelta(seconds=120)
        await session.commit()
    await cluster.cycle()
    reply = await cluster.heartbeat(cred)
    assert [(s["task_id"], s["reason"]) for s in reply["stop"]] == [(spec["task_id"], "timeout")]
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], job["id"], "stopped", signal=9)])
    assert (await cluster.job(token, job["id"]))["state"] == "TIMEOUT"


async def _node_state(cluster: Cluster, node_id: int) -> NodeState | None:
    async with cluster.sessionmaker() as session:
        return await session.scalar(select(Node.state).where(Node.id == node_id))


async def test_time_limit_check_is_exact_to_the_microsecond(engine: AsyncEngine) -> None:
    """Overdue once started_at + time limit + grace is before now, not at now (both databases)."""
    settings = Settings(
        database_url="sqlite:///unused.db", policy=PolicySettings(preemption_grace_s=30.000001)
    )
    now = datetime(2025, 6, 1, 12, 0, 0, 500, tzinfo=UTC)
    span = timedelta(seconds=86_400) + timedelta(seconds=settings.policy.preemption_grace_s)
    async with make_sessionmaker(engine)() as s:
        org = await factories.org(s)
        user = await factories.user(s, org)
        node, gpus = await factories.node(s, gpus=3)
        tasks = {}
        for offset_us, gpu in zip((1, 0, -1), gpus, strict=True):
            job = await factories.job(s, org, user, state=JobState.RUNNING, time_limit_s=86_400)
            start = now - span - timedelta(microseconds=offset_us)
            tasks[offset_us] = await factories.attempt(s, job, node, [gpu], start=start, end=None)
        await s.commit()
        work = await lifecycle.find_work(s, now=now, settings=settings)
    assert work.overdue_tasks == [tasks[1].id]


async def test_requeue_is_asked_for_apart_from_preemptible(database_url: str) -> None:
    """`--requeue` requeues a job that is not preemptible, `--no-requeue` keeps a preemptible
    one from it; the next attempt sees FAIRGPU_RESTART_COUNT."""
    settings = fast_settings(database_url, **SILENT_SETTINGS)
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=2)
        token = await cluster.user_token(org)
        node = await cluster.register(await cluster.join_token(), gpus=2)
        cred = node["credential"]
        again = await cluster.submit(token, gpus_per_node=1, requeue=True)
        ends = await cluster.submit(token, gpus_per_node=1, preemptible=True, requeue=False)
        assert (again["requeue"], ends["requeue"]) == (True, False)
        await cluster.cycle()
        specs = {s["job_id"]: s for s in (await cluster.heartbeat(cred))["start"]}
        assert specs[again["id"]]["env"]["FAIRGPU_RESTART_COUNT"] == "0"
        await cluster.heartbeat(
            cred, tasks=[report(s["task_id"], job_id, "running") for job_id, s in specs.items()]
        )
        await fall_silent(cluster, node["node_id"], token, ends["id"])
        assert (await cluster.job(token, ends["id"]))["state"] == "NODE_FAIL"
        requeued = await cluster.job(token, again["id"])
        assert requeued["state"] in ("PENDING", "STARTING")
        assert requeued["requeue_count"] == 1

        await cluster.heartbeat(cred)  # the node is back
        started = None
        for _ in range(50):  # the requeue backoff, then a cycle starts it again
            await cluster.cycle()
            start = (await cluster.heartbeat(cred))["start"]
            if start:
                started = start[0]
                break
            await asyncio.sleep(0.1)
        assert started is not None
        assert started["job_id"] == again["id"]
        assert started["env"]["FAIRGPU_RESTART_COUNT"] == "1"
        assert started["env"]["SLURM_RESTART_COUNT"] == "1"


async def test_the_loop_keeps_its_node_layout_until_a_node_changes(cluster: Cluster) -> None:
    """The runtime's Scheduler reuses its layout across cycles, and a drain is seen at once."""
    org = await cluster.org(guaranteed=16)
    token = await cluster.user_token(org)
    join = await cluster.join_token()
    first = await cluster.register(join, gpus=8)
    second = await cluster.register(join, gpus=8)
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(first["credential"]))["start"]  # best fit: lowest id
    await cluster.heartbeat(
        first["credential"], tasks=[report(spec["task_id"], job["id"], "running")]
    )
    scheduler = cluster.runtime.scheduler
    built = scheduler.layouts_built
    await cluster.cycle()
    await cluster.cycle()
    assert scheduler.layouts_built == built  # fresh Node rows each cycle, equal: layout kept
    await cluster.call("POST", f"/v1/nodes/{second['node_id']}/drain", cluster.admin, {})
    whole = await cluster.submit(token, gpus_per_node=8)  # fits only the drained node
    await cluster.cycle()
    await cluster.cycle()
    assert scheduler.layouts_built > built
    assert (await cluster.job(token, whole["id"]))["state"] == "PENDING"
    assert (await cluster.heartbeat(second["credential"]))["start"] == []
