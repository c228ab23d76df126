"""Every accepted job is deliverable: a task that cannot be sent fails alone; requeues capped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from scheduler.db import Job, Node
from scheduler.db.types import utcnow
from scheduler.services.invariants import check_invariants
from scheduler.states import NodeState
from tests.scheduling.harness import Cluster, fast_settings, report, running_cluster


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c


async def _spoil(cluster: Cluster, job_id: int) -> None:
    """Store what today's limits refuse, as a job stored under older limits would be."""
    async with cluster.sessionmaker() as session:
        await session.execute(update(Job).where(Job.id == job_id).values(env={"1BAD": "x"}))
        await session.commit()


async def _events(cluster: Cluster, token: str, job_id: int) -> list[dict[str, object]]:
    events = await cluster.call("GET", f"/v1/jobs/{job_id}/events", token)
    return list(events["data"])


@pytest.mark.parametrize("long_poll", [False, True])
async def test_a_task_that_cannot_be_sent_fails_alone(cluster: Cluster, long_poll: bool) -> None:
    bad_org, good_org = await cluster.org(guaranteed=1), await cluster.org(guaranteed=1)
    bad_token, good_token = await cluster.user_token(bad_org), await cluster.user_token(good_org)
    node = await cluster.register(await cluster.join_token(), gpus=2)
    cred = node["credential"]
    await cluster.heartbeat(cred)
    bad = await cluster.submit(bad_token, gpus_per_node=1)
    good = await cluster.submit(good_token, gpus_per_node=1)
    await _spoil(cluster, bad["id"])
    if long_poll:  # the held request is answered with what can be sent, then the next fails it
        held = asyncio.create_task(cluster.heartbeat(cred, wait_s=5))
        await asyncio.sleep(0.2)
        await cluster.cycle()
        first = await asyncio.wait_for(held, 5)
        assert {s["job_id"] for s in first["start"]} <= {good["id"]}
    else:
        await cluster.cycle()
    reply = await cluster.heartbeat(cred)
    starts = [s for s in reply["start"] if s["job_id"] == good["id"]]
    assert starts or long_poll
    assert bad["id"] not in {s["job_id"] for s in reply["start"]}
    spec = starts[0] if starts else first["start"][0]

    failed = await cluster.job(bad_token, bad["id"])
    assert failed["state"] == "FAILED"
    assert "cannot be sent to node" in failed["state_reason"]
    assert "1BAD" in failed["state_reason"] or "env" in failed["state_reason"]
    assert any(
        e["to_state"] == "FAILED" and "cannot be sent" in str(e["reason"])
        for e in await _events(cluster, bad_token, bad["id"])
    )
    # The node carries on: the other company's task runs on it.
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], good["id"], "running")])
    assert (await cluster.job(good_token, good["id"]))["state"] == "RUNNING"
    async with cluster.sessionmaker() as session:
        state = await session.scalar(select(Node.state).where(Node.id == node["node_id"]))
        invariants = await check_invariants(session)
    assert state is NodeState.READY
    assert invariants.ok, invariants.violations


async def test_requeues_are_capped_and_spaced(database_url: str) -> None:
    settings = fast_settings(database_url, max_requeues=2, requeue_backoff_s=600.0)
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=1)
        token = await cluster.user_token(org)
        node = await cluster.register(await cluster.join_token(), gpus=1)
        cred = node["credential"]
        job = await cluster.submit(token, gpus_per_node=1, preemptible=True)
        for attempt in range(3):
            await cluster.cycle()
            (spec,) = (await cluster.heartbeat(cred))["start"]
            await cluster.heartbeat(
                cred, tasks=[report(spec["task_id"], job["id"], "lost", reason="node rebooted")]
            )
            now = await cluster.job(token, job["id"])
            if attempt == 2:
                break
            assert now["state"] == "PENDING"
            assert now["requeue_count"] == attempt + 1
            await cluster.cycle()
            assert (await cluster.heartbeat(cred))["start"] == []  # backing off
            explained = await cluster.call("GET", f"/v1/jobs/{job['id']}/explain", token)
            assert explained["reasons"][0]["code"] == "BeginTime"
            async with cluster.sessionmaker() as session:
                not_before = await session.scalar(select(Job.not_before).where(Job.id == job["id"]))
                assert not_before is not None
                # 600 s, then 1200 s: doubled per requeue.
                wait_s = (not_before - utcnow()).total_seconds()
                assert 600 * 2**attempt - 30 < wait_s <= 600 * 2**attempt
                await session.execute(
                    update(Job)
                    .where(Job.id == job["id"])
                    .values(not_before=utcnow() - timedelta(seconds=1))
                )
                await session.commit()
        assert now["state"] == "NODE_FAIL"
        assert now["requeue_count"] == 2
        assert "not requeued" in now["state_reason"]
        assert "max_requeues = 2" in now["state_reason"]
        events = await _events(cluster, token, job["id"])
        assert "not requeued" in str(events[-1]["reason"]) or any(
            "not requeued" in str(e["reason"]) for e in events
        )
