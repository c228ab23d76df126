"""The real node agent (simulated GPUs, real processes) against the real app and database."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agents.client import AgentClient
from agents.daemon import Agent, AgentConfig, AgentError
from agents.gpu import SimulatedBackend, parse_simulate_spec
from tests.scheduling.harness import Cluster, fast_settings, running_cluster


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c


@contextlib.asynccontextmanager
async def agent(cluster: Cluster, tmp_path: Path, join: str) -> AsyncIterator[Agent]:
    config = AgentConfig(
        server="http://fairgpu",
        state_dir=tmp_path / "agent",
        name="sim-node",
        join_token=join,
        address="127.0.0.1",
        poll_interval_s=0.02,
        max_backoff_s=0.2,
    )
    transport = httpx.ASGITransport(app=cluster.app)
    client = AgentClient(config.server, transport=transport)
    node = Agent(config, SimulatedBackend(parse_simulate_spec("2xH100"), seed="sim"), client)
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    try:
        yield node
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await client.aclose()


async def _wait_state(cluster: Cluster, token: str, job_id: int, want: str) -> float:
    began = time.monotonic()
    while time.monotonic() - began < 20:
        job = await cluster.job(token, job_id)
        if job["state"] == want:
            return time.monotonic() - began
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} is {job['state']}, not {want}")


async def test_real_agent_runs_and_cancels_jobs(cluster: Cluster, tmp_path: Path) -> None:
    org = await cluster.org(guaranteed=2)
    token = await cluster.user_token(org)
    async with agent(cluster, tmp_path, await cluster.join_token()):
        done = await cluster.submit(
            token, command=["sh", "-c", "echo hello from $FAIRGPU_JOB_ID"], gpus_per_node=1
        )
        await _wait_state(cluster, token, done["id"], "COMPLETED")
        for _ in range(100):  # the log's last chunk may follow the exit report
            logs = await cluster.call("GET", f"/v1/jobs/{done['id']}/logs", token)
            if f"hello from {done['id']}" in str(logs):
                break
            await asyncio.sleep(0.05)
        assert f"hello from {done['id']}" in str(logs)

        long = await cluster.submit(token, command=["sleep", "60"], gpus_per_node=2)
        await _wait_state(cluster, token, long["id"], "RUNNING")
        await cluster.call("POST", f"/v1/jobs/{long['id']}/cancel", token)
        took_s = await _wait_state(cluster, token, long["id"], "CANCELLED")
        assert took_s < 5.0, took_s  # long-poll delivers the stop at once; sleep dies on TERM


async def test_the_agent_keeps_a_renewed_credential_and_stops_once_revoked(
    database_url: str, tmp_path: Path
) -> None:
    # A lifetime of 6 s: renewed from the third second on, at the agent's next heartbeat.
    settings = fast_settings(database_url, node_credential_ttl_s=6.0, heartbeat_interval_s=0.5)
    async with running_cluster(settings) as cluster:
        config = AgentConfig(
            server="http://fairgpu", state_dir=tmp_path / "agent", name="sim-node",
            join_token=await cluster.join_token(), address="127.0.0.1", poll_interval_s=0.02,
        )  # fmt: skip
        client = AgentClient(config.server, transport=httpx.ASGITransport(app=cluster.app))
        node = Agent(config, SimulatedBackend(parse_simulate_spec("2xH100"), seed="s"), client)
        run = asyncio.create_task(node.run(asyncio.Event()))
        try:
            await asyncio.wait_for(node.connected.wait(), 10)
            assert node.credential is not None
            first = node.credential.credential
            deadline = time.monotonic() + 15
            while node.credential.credential == first:
                assert time.monotonic() < deadline, "never renewed"
                await asyncio.sleep(0.1)
            stored = node.state.load_credential()
            assert stored is not None
            assert stored.credential == node.credential.credential  # on disk for a restart
            # The renewed credential works: a later heartbeat is accepted. The server may hold
            # a heartbeat (long poll) and writes liveness in batches, so wait for it to show.
            before = await _last_heartbeat(cluster)
            while await _last_heartbeat(cluster) <= before:
                assert time.monotonic() < deadline + 15, "no heartbeat after the renewal"
                await asyncio.sleep(0.1)
            [row] = (await cluster.call("GET", "/v1/nodes", cluster.admin))["data"]
            await cluster.call("POST", f"/v1/nodes/{row['id']}/revoke", cluster.admin)
            with pytest.raises(AgentError, match="fairgpu node approve sim-node"):
                await asyncio.wait_for(run, 10)
            assert node.state.load_credential() is None  # a restart registers anew
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            await client.aclose()


async def _last_heartbeat(cluster: Cluster) -> str:
    [row] = (await cluster.call("GET", "/v1/nodes", cluster.admin))["data"]
    return str(row["last_heartbeat_at"])
