"""Wake-ups between server processes (scheduler/services/wakeups.py, PostgreSQL LISTEN/NOTIFY).

An API-only process (`run_scheduler` off, as `fairgpu server --workers N` runs its HTTP workers)
and a scheduler runtime of its own share one database. With the timer cycle and the long-poll
re-check set to ten minutes, only the notifications can make a submitted job reach its node's
held heartbeat within seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.db.engine import asyncpg_dsn
from scheduler.services.wakeups import MAX_PAYLOAD_BYTES, node_payloads, parse_node_payload
from tests.scheduling.harness import Cluster, fast_settings, now, running_cluster, sample
from tests.scheduling.test_lease import replica

PG_ONLY = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
FAR_S = 600.0  # timers that never fire during a test


@given(st.sets(st.integers(min_value=1, max_value=2**62), max_size=3000))
def test_node_payloads_carry_every_id_within_the_limit(ids: set[int]) -> None:
    payloads = node_payloads(ids)
    assert all(0 < len(p.encode()) < MAX_PAYLOAD_BYTES for p in payloads)
    carried = [i for p in payloads for i in parse_node_payload(p)]
    assert sorted(carried) == sorted(ids)


def _samples(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [sample(i, uuid, now()) for i, uuid in enumerate(node["gpu_uuids"])]


async def _start_delay(cluster: Cluster, node: dict[str, Any], user: str) -> tuple[float, int]:
    """Hold the node's heartbeat, submit a job that fits it, and time its arrival."""
    cred = node["credential"]
    held = asyncio.create_task(cluster.heartbeat(cred, samples=_samples(node), wait_s=30.0))
    await asyncio.sleep(0.3)  # the heartbeat is held before the job exists
    assert not held.done()
    began = time.monotonic()
    job = await cluster.submit(user, gpus_per_node=2)
    reply = await asyncio.wait_for(held, 20)
    assert [s["job_id"] for s in reply["start"]] == [job["id"]]
    return time.monotonic() - began, job["id"]


@PG_ONLY
async def test_a_submission_to_an_api_only_process_starts_at_once(database_url: str) -> None:
    api_only = fast_settings(
        database_url, run_scheduler=False, cycle_interval_s=FAR_S, long_poll_recheck_s=FAR_S
    )
    async with running_cluster(api_only) as cluster:
        assert cluster.runtime.is_leader is False
        leader_settings = fast_settings(database_url, cycle_interval_s=FAR_S)
        async with replica(leader_settings) as leader:
            await leader.wait_cycles(1)
            assert leader.is_leader
            org = await cluster.org(guaranteed=8)
            user = await cluster.user_token(org)
            node = await cluster.register(await cluster.join_token(), gpus=2)
            await cluster.heartbeat(node["credential"], samples=_samples(node))
            delay_s, _ = await _start_delay(cluster, node, user)
            # A cycle (wake the leader) and a held heartbeat released (wake the node): both
            # crossed processes through PostgreSQL; without them this waits ten minutes.
            assert delay_s < 5.0
            assert cluster.runtime.wakeups is not None
            assert cluster.runtime.wakeups.sent >= 1
            assert leader.wakeups is not None
            assert leader.wakeups.sent >= 1


@PG_ONLY
async def test_the_channel_comes_back_after_its_connection_is_killed(database_url: str) -> None:
    api_only = fast_settings(
        database_url, run_scheduler=False, cycle_interval_s=FAR_S, long_poll_recheck_s=FAR_S
    )
    leader_settings = fast_settings(database_url, cycle_interval_s=FAR_S)
    async with running_cluster(api_only) as cluster, replica(leader_settings) as leader:
        await leader.wait_cycles(1)
        org = await cluster.org(guaranteed=8)
        user = await cluster.user_token(org)
        node = await cluster.register(await cluster.join_token(), gpus=4)
        await cluster.heartbeat(node["credential"], samples=_samples(node))
        wakeups = [cluster.runtime.wakeups, leader.wakeups]
        assert all(w is not None and w.connected.is_set() for w in wakeups)
        admin = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'fairgpu-wakeups' AND datname = current_database()"
            )
        finally:
            await admin.close()
        assert killed == 2
        deadline = time.monotonic() + 10
        while not all(w is not None and w.connected.is_set() for w in wakeups):
            assert time.monotonic() < deadline, "the wake-up channel did not come back"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # both listening again
        delay_s, _ = await _start_delay(cluster, node, user)
        assert delay_s < 5.0
