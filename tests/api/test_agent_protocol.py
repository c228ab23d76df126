"""The agent protocol over HTTP: registration, credentials, reports, stale tasks, long-poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from protocol.states import GpuHealth
from scheduler.db import Gpu, Task
from scheduler.services.invariants import check_invariants
from tests.scheduling.harness import Cluster, fast_settings, now, report, running_cluster, sample


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c


async def test_register_again_with_the_credential_rotates_it(cluster: Cluster) -> None:
    join = await cluster.join_token()
    first = await cluster.register(join, name="gpu-a", gpus=4)
    second = await cluster.register(first["credential"], name="gpu-a", gpus=4)
    assert first["node_id"] == second["node_id"]
    assert first["credential"] != second["credential"]
    await cluster.call("POST", "/v1/agent/heartbeat", first["credential"], {}, expect=401)
    await cluster.heartbeat(second["credential"])
    nodes = await cluster.call("GET", "/v1/nodes", cluster.admin)
    assert [n["name"] for n in nodes["data"]] == ["gpu-a"]


async def test_register_refuses_bad_tokens(cluster: Cluster) -> None:
    body = {
        "name": "n",
        "site": "s",
        "domain": "d",
        "hostname": "h",
        "address": "a",
        "agent_version": "v",
        "gpus": [],
    }
    await cluster.call("POST", "/v1/agent/register", "fg_j_nonsense", body, expect=401)
    org = await cluster.org()
    user = await cluster.user_token(org)
    await cluster.call("POST", "/v1/agent/register", user, body, expect=401)
    # A user token cannot speak the heartbeat either.
    await cluster.call("POST", "/v1/agent/heartbeat", user, {}, expect=403)
    # A join token with one use registers one node.
    created = await cluster.call("POST", "/v1/join-tokens", cluster.admin, {"uses": 1})
    await cluster.call("POST", "/v1/agent/register", created["token"], body)
    other = {**body, "name": "n2"}
    await cluster.call("POST", "/v1/agent/register", created["token"], other, expect=401)


async def test_unknown_live_task_is_stopped_as_stale(cluster: Cluster) -> None:
    node = await cluster.register(await cluster.join_token())
    reply = await cluster.heartbeat(node["credential"], tasks=[report(424242, 1, "running")])
    assert [(s["task_id"], s["reason"]) for s in reply["stop"]] == [(424242, "stale")]
    # An ended task the server does not know is simply acknowledged.
    reply = await cluster.heartbeat(
        node["credential"], tasks=[report(424242, 1, "exited", exit_code=0)]
    )
    assert reply["stop"] == []


async def test_unhealthy_gpu_is_not_allocated(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=2)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token(), gpus=2)
    uuids = node["gpu_uuids"]
    await cluster.heartbeat(
        node["credential"],
        samples=[
            sample(0, uuids[0], now(), health="unhealthy", health_reason="XID 79", xid_events=[79]),
            sample(1, uuids[1], now()),
        ],
    )
    async with cluster.sessionmaker() as session:
        health = dict((await session.execute(select(Gpu.index, Gpu.health))).all())
    assert health == {0: GpuHealth.UNHEALTHY, 1: GpuHealth.HEALTHY}
    job = await cluster.submit(token, gpus_per_node=2)
    await cluster.cycle()
    assert (await cluster.job(token, job["id"]))["state"] == "PENDING"
    small = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    reply = await cluster.heartbeat(node["credential"])
    assert [(s["job_id"], s["gpus"]) for s in reply["start"]] == [(small["id"], [1])]


async def test_long_poll_returns_as_soon_as_work_appears(database_url: str) -> None:
    """The submit's wake-up, not the poll's end or a re-check, answers the held heartbeat: both
    are a minute away here, so a reply within 20 s (seconds on a loaded machine, a fraction of one
    on a quiet one) can only come from the wake-up."""
    settings = fast_settings(database_url, heartbeat_long_poll_s=60.0, long_poll_recheck_s=60.0)
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=8)
        token = await cluster.user_token(org)
        node = await cluster.register(await cluster.join_token())
        await cluster.heartbeat(node["credential"])

        held = asyncio.create_task(cluster.heartbeat(node["credential"], wait_s=60))
        await asyncio.sleep(0.3)
        assert not held.done()  # nothing to do: the server holds the request
        began = time.monotonic()
        job = await cluster.submit(token, gpus_per_node=1)
        reply = await asyncio.wait_for(held, 30)
        elapsed_s = time.monotonic() - began
        assert [s["job_id"] for s in reply["start"]] == [job["id"]]
        assert elapsed_s < 20.0, elapsed_s


async def test_long_poll_times_out_with_an_empty_reply(database_url: str) -> None:
    settings = fast_settings(database_url, heartbeat_long_poll_s=0.5)
    async with running_cluster(settings) as cluster:
        node = await cluster.register(await cluster.join_token())
        began = time.monotonic()
        reply = await cluster.heartbeat(node["credential"], wait_s=60)
        elapsed_s = time.monotonic() - began
        assert reply["start"] == []
        assert reply["stop"] == []
        # Capped by the server's heartbeat_long_poll_s (0.5 s), not the agent's 60 s: the bound
        # only tells the two apart (a loaded CI worker took 4.7 s), it times nothing.
        assert 0.4 <= elapsed_s < 30.0, elapsed_s


async def test_cancel_of_a_running_job_reaches_the_agent(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token())
    cred = node["credential"]
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    await cluster.heartbeat(cred, tasks=[report(spec["task_id"], job["id"], "running")])

    held = asyncio.create_task(cluster.heartbeat(cred, wait_s=10))
    await asyncio.sleep(0.2)
    await cluster.call("POST", f"/v1/jobs/{job['id']}/cancel", token)
    reply = await asyncio.wait_for(held, 5)
    assert [(s["task_id"], s["reason"]) for s in reply["stop"]] == [(spec["task_id"], "cancel")]
    stopped = report(spec["task_id"], job["id"], "stopped", signal=15)
    reply = await cluster.heartbeat(cred, tasks=[stopped])
    assert reply["stop"] == []
    assert (await cluster.job(token, job["id"]))["state"] == "CANCELLED"
    async with cluster.sessionmaker() as session:
        task = await session.get(Task, spec["task_id"])
        assert task is not None
        assert task.ended_at is not None


async def test_stop_before_the_agent_reported_the_task_ends_it_at_once(cluster: Cluster) -> None:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token())
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    assert (await cluster.job(token, job["id"]))["state"] == "STARTING"
    await cluster.call("POST", f"/v1/jobs/{job['id']}/cancel", token)
    # The agent never saw the start (a lost reply): the server ends the task itself.
    reply = await cluster.heartbeat(node["credential"])
    assert reply["start"] == []
    assert reply["stop"] == []
    assert (await cluster.job(token, job["id"]))["state"] == "CANCELLED"
    async with cluster.sessionmaker() as session:
        report_ = await check_invariants(session)
    assert report_.ok, report_.violations


async def test_held_heartbeats_hold_no_pooled_connection(database_url: str) -> None:
    # Routed (no direct route): authentication's session must not stay checked out while the
    # heartbeat is held, or a few idle nodes would take the whole pool.
    async with running_cluster(fast_settings(database_url, hot_paths=False)) as cluster:
        join = await cluster.join_token()
        credentials = [(await cluster.register(join, gpus=1))["credential"] for _ in range(12)]
        for credential in credentials:
            await cluster.heartbeat(credential)  # each node's first heartbeat is not quiet
        pool = cluster.app.state.engine.pool
        idle = pool.checkedout()
        held = [
            asyncio.create_task(cluster.heartbeat(credential, wait_s=3))
            for credential in credentials
        ]
        await asyncio.sleep(0.5)
        fewest = len(credentials)
        for _ in range(20):  # the long-poll's short rechecks come and go (PostgreSQL)
            fewest = min(fewest, pool.checkedout() - idle)
            await asyncio.sleep(0.02)
        assert not any(task.done() for task in held)
        assert fewest < len(credentials) // 2, fewest  # each held request would pin one
        await asyncio.wait_for(cluster.call("GET", "/v1/jobs", cluster.admin), 5)
        await asyncio.wait_for(asyncio.gather(*held), 10)
