"""What an agent says it can do decides what its replies carry: a node whose agent does not
take a job's warning signal (older than the field, so it may refuse a reply that has one and
stall the whole node) is not given the job: it waits for a node that takes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from protocol.agent import AGENT_CAPABILITIES
from scheduler.db import Node
from tests.scheduling.harness import Cluster, fast_settings, report, running_cluster


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c


async def _signal_job_start(cluster: Cluster, credential: str) -> dict[str, Any]:
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    await cluster.submit(token, gpus_per_node=1, signal="B:USR1@60")
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(credential))["start"]
    return spec


async def _capabilities(cluster: Cluster, node_id: int) -> list[str] | None:
    async with cluster.sessionmaker() as session:
        return await session.scalar(select(Node.capabilities).where(Node.id == node_id))


async def test_an_agent_that_does_not_say_is_not_given_a_signal_job(cluster: Cluster) -> None:
    # As an older agent: no field.
    node = await cluster.register(await cluster.join_token(), capabilities=None)
    assert await _capabilities(cluster, node["node_id"]) is None
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    job = await cluster.submit(token, gpus_per_node=1, signal="B:USR1@60")
    await cluster.cycle()
    # Placed only where the warning would arrive (tests/scheduling/test_capabilities.py).
    assert (await cluster.heartbeat(node["credential"]))["start"] == []
    assert (await cluster.job(token, job["id"]))["state"] == "PENDING"


async def test_an_agent_that_can_signal_gets_the_signal(cluster: Cluster) -> None:
    node = await cluster.register(await cluster.join_token(), capabilities=None)
    # An upgraded agent says so on its first heartbeat, keeping its credential.
    await cluster.heartbeat(node["credential"], capabilities=list(AGENT_CAPABILITIES))
    assert await _capabilities(cluster, node["node_id"]) == list(AGENT_CAPABILITIES)
    spec = await _signal_job_start(cluster, node["credential"])
    assert spec["signal"] == {"name": "USR1", "lead_s": 60.0, "batch_only": True}
    # Quiet heartbeats (no capabilities) leave them as they are.
    await cluster.heartbeat(
        node["credential"], tasks=[report(spec["task_id"], spec["job_id"], "running")]
    )
    assert await _capabilities(cluster, node["node_id"]) == list(AGENT_CAPABILITIES)


async def test_registration_carries_capabilities_and_refuses_bad_ones(cluster: Cluster) -> None:
    join = await cluster.join_token()
    body = {
        "name": "capable",
        "site": "dc1",
        "domain": "rack1",
        "hostname": "capable",
        "address": "10.0.0.9",
        "agent_version": "test",
        "gpus": [{"index": 0, "uuid": "GPU-capable-0", "model": "H100", "memory_bytes": 1 << 30}],
    }
    for bad in (["Signal"], ["x" * 33], ["a"] * 33, "signal"):
        refused = await cluster.call(
            "POST", "/v1/agent/register", join, {**body, "capabilities": bad}, expect=422
        )
        assert refused["status"] == 422
    # A name this server does not know yet (a newer agent) is kept, not refused.
    node = await cluster.call(
        "POST", "/v1/agent/register", join, {**body, "capabilities": ["signal", "future-1"]}
    )
    assert await _capabilities(cluster, node["node_id"]) == ["signal", "future-1"]
    await cluster.call(
        "POST", "/v1/agent/heartbeat", node["credential"], {"capabilities": ["BAD"]}, expect=422
    )
