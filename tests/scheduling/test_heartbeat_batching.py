"""Quiet heartbeats: liveness and samples buffered in memory and flushed in batches."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from protocol.states import GpuHealth
from scheduler.db import Gpu, Node, UsageRecord
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.states import NodeState
from tests.scheduling.harness import Cluster, fast_settings, now, report, running_cluster, sample

NEVER_S = 3600.0  # a flush interval the loop never reaches during a test


async def _running_node(cluster: Cluster, gpus: int = 2) -> dict[str, Any]:
    """A node running one 1-GPU job, acknowledged: what follows are quiet heartbeats."""
    org = await cluster.org(guaranteed=gpus)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=gpus)
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(node["credential"]))["start"]
    node["running"] = [report(spec["task_id"], job["id"], "running")]
    node["gpu_index"] = spec["gpus"][0]
    return node


def _samples(node: dict[str, Any], at: datetime, energy: float, **kw: Any) -> list[Any]:
    return [
        sample(i, uuid, at, utilization_ratio=0.5, energy_joules=energy, **kw)
        for i, uuid in enumerate(node["gpu_uuids"])
    ]


async def _gpu(cluster: Cluster, node_id: int, index: int) -> Gpu:
    async with cluster.sessionmaker() as session:
        gpu = await session.scalar(select(Gpu).where(Gpu.node_id == node_id, Gpu.index == index))
        assert gpu is not None
        return gpu


async def _ledger(cluster: Cluster) -> tuple[float, float]:
    async with cluster.sessionmaker() as session:
        busy, energy = (
            await session.execute(
                select(
                    func.coalesce(func.sum(UsageRecord.gpu_seconds_busy), 0.0),
                    func.coalesce(func.sum(UsageRecord.energy_joules), 0.0),
                )
            )
        ).one()
    return float(busy), float(energy)


async def test_quiet_heartbeats_are_buffered_then_flushed_with_their_usage(
    database_url: str,
) -> None:
    settings = fast_settings(database_url, heartbeat_flush_interval_s=NEVER_S)
    async with running_cluster(settings) as cluster:
        node = await _running_node(cluster)
        cred, node_id, held = node["credential"], node["node_id"], node["gpu_index"]
        t0 = now()
        # The acknowledging report changes the task: the full path, written at once.
        await cluster.heartbeat(cred, tasks=node["running"], samples=_samples(node, t0, 100.0))
        assert (await _gpu(cluster, node_id, held)).last_sample_at == t0
        assert not cluster.runtime.live.pending()

        t1, t2 = t0 + timedelta(seconds=10), t0 + timedelta(seconds=20)
        for at, energy in ((t1, 300.0), (t2, 700.0)):
            reply = await cluster.heartbeat(
                cred, tasks=node["running"], samples=_samples(node, at, energy)
            )
            assert reply["start"] == []
            assert reply["stop"] == []
        # Answered from memory: nothing written yet.
        assert cluster.runtime.live.pending()
        assert (await _gpu(cluster, node_id, held)).last_sample_at == t0
        assert await _ledger(cluster) == (0.0, 0.0)

        flushed = await cluster.runtime.flush_heartbeats()
        assert flushed.nodes == 1
        assert flushed.gpus == 2
        gpu = await _gpu(cluster, node_id, held)
        assert gpu.last_sample_at == t2
        assert gpu.last_sample is not None
        assert gpu.last_sample["energy_joules"] == 700.0
        busy, energy = await _ledger(cluster)
        # Only the allocated GPU counts: 0.5 busy over the 20 s since t0, 600 J.
        assert busy == pytest.approx(10.0)
        assert energy == pytest.approx(600.0)
        async with cluster.sessionmaker() as session:
            seen = await session.scalar(select(Node.last_heartbeat_at).where(Node.id == node_id))
        assert seen is not None
        assert seen > t0

        # A resend of samples already counted adds nothing.
        await cluster.heartbeat(cred, tasks=node["running"], samples=_samples(node, t2, 700.0))
        await cluster.runtime.flush_heartbeats()
        assert await _ledger(cluster) == pytest.approx((10.0, 600.0))


async def test_liveness_reaches_the_database_and_a_silent_node_still_goes_down(
    database_url: str,
) -> None:
    settings = fast_settings(database_url, node_timeout_s=1.0, heartbeat_flush_interval_s=0.1)
    async with running_cluster(settings) as cluster:
        node = await cluster.register(await cluster.join_token(), gpus=1)
        cred, node_id = node["credential"], node["node_id"]
        await cluster.heartbeat(cred, samples=_samples(node, now(), 1.0))  # learns the GPUs
        # Quiet heartbeats for twice the node timeout: their liveness reaches the database in
        # time, so the node stays ready.
        for _ in range(10):
            await cluster.heartbeat(cred, samples=_samples(node, now(), 1.0))
            await asyncio.sleep(0.2)
        assert cluster.runtime.live.flushes > 0
        async with cluster.sessionmaker() as session:
            state = await session.scalar(select(Node.state).where(Node.id == node_id))
        assert state is NodeState.READY
        # Then silence: down after the timeout, at the next cycle. Under load that cycle can be
        # seconds away (the leader spaces its cycles to 4x their duration, runtime.py), so
        # the bound is generous: what matters is that the buffer does not keep it alive.
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            async with cluster.sessionmaker() as session:
                state = await session.scalar(select(Node.state).where(Node.id == node_id))
            if state is NodeState.DOWN:
                break
        assert state is NodeState.DOWN
        # Its next heartbeat brings it back at once (the full path, not the buffer).
        await cluster.heartbeat(cred, samples=_samples(node, now(), 1.0))
        async with cluster.sessionmaker() as session:
            state = await session.scalar(select(Node.state).where(Node.id == node_id))
        assert state is NodeState.READY


async def test_a_failed_flush_loses_neither_samples_nor_task_changes(
    database_url: str, tmp_path: Any
) -> None:
    settings = fast_settings(database_url, heartbeat_flush_interval_s=NEVER_S)
    async with running_cluster(settings) as cluster:
        node = await _running_node(cluster)
        cred, node_id, held = node["credential"], node["node_id"], node["gpu_index"]
        t0 = now()
        await cluster.heartbeat(cred, tasks=node["running"], samples=_samples(node, t0, 0.0))
        t1 = t0 + timedelta(seconds=4)
        await cluster.heartbeat(cred, tasks=node["running"], samples=_samples(node, t1, 80.0))

        broken = make_engine(f"sqlite:///{tmp_path}/missing/dir/db.sqlite")
        try:
            with pytest.raises(OperationalError):
                await cluster.runtime.live.flush(make_sessionmaker(broken), settings, now())
        finally:
            await broken.dispose()
        assert cluster.runtime.live.failures == 1
        assert cluster.runtime.live.pending()  # kept for the next flush

        # A task-state change meanwhile is not buffered: it is stored at once.
        (task,) = node["running"]
        ended = report(task["task_id"], task["job_id"], "exited", exit_code=0)
        await cluster.heartbeat(cred, tasks=[ended])
        assert (await cluster.job(cluster.admin, task["job_id"]))["state"] == "COMPLETED"

        await cluster.runtime.flush_heartbeats()
        assert (await _gpu(cluster, node_id, held)).last_sample_at == t1
        busy, energy = await _ledger(cluster)
        assert busy == pytest.approx(2.0)  # 0.5 over the 4 s between the two samples
        assert energy == pytest.approx(80.0)


async def test_health_news_skips_the_buffer_and_stale_knowledge_is_corrected(
    database_url: str,
) -> None:
    settings = fast_settings(database_url, heartbeat_flush_interval_s=NEVER_S)
    async with running_cluster(settings) as cluster:
        node = await cluster.register(await cluster.join_token(), gpus=1)
        cred, node_id = node["credential"], node["node_id"]
        await cluster.heartbeat(cred, samples=_samples(node, now(), 1.0))
        await cluster.heartbeat(cred, samples=_samples(node, now(), 2.0))
        assert cluster.runtime.live.pending()  # quiet: buffered
        await cluster.runtime.flush_heartbeats()

        # A GPU turning unhealthy is news: written at once.
        bad = _samples(node, now(), 3.0, health="unhealthy", health_reason="XID 79")
        await cluster.heartbeat(cred, samples=bad)
        assert (await _gpu(cluster, node_id, 0)).health is GpuHealth.UNHEALTHY
        assert not cluster.runtime.live.pending()

        # Another replica (here: a direct write) marked it healthy again while this process
        # still believes it unhealthy; the node keeps reporting unhealthy. The fast path
        # accepts it on stale knowledge, and the flush puts the database right.
        async with cluster.sessionmaker() as session, session.begin():
            gpu = await session.scalar(select(Gpu).where(Gpu.node_id == node_id))
            assert gpu is not None
            gpu.health = GpuHealth.HEALTHY
        await cluster.heartbeat(cred, samples=_samples(node, now(), 4.0, health="unhealthy"))
        assert cluster.runtime.live.pending()
        flushed = await cluster.runtime.flush_heartbeats()
        assert flushed.health_changed
        assert (await _gpu(cluster, node_id, 0)).health is GpuHealth.UNHEALTHY
