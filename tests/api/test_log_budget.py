"""One org keeps at most `org_log_max_bytes` of log on the server: past it its oldest ended
tasks' logs go first (reading one says so), then its running tasks' new output is dropped with
a marker; other orgs' logs are never touched, and the per-org counter stays exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import LargeBinary, cast, func, select

from protocol.agent import Heartbeat
from scheduler.db import Job, LogChunk, Org, OrgLogBytes, Task
from scheduler.db.types import utcnow
from scheduler.services.heartbeat.full import heartbeat
from scheduler.services.logbudget import BUDGET_MARKER
from scheduler.services.logretention import LogRetention
from tests.harness.locks import done_or_waiting
from tests.scheduling.harness import Cluster, fast_settings, report, running_cluster

CHUNK = 4096
BUDGET = 10 * CHUNK


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    settings = fast_settings(database_url, org_log_max_bytes=BUDGET, task_log_max_bytes=64 * 1024)
    async with running_cluster(settings) as c:
        yield c


def chunks(task_id: int, start: int, count: int, letter: str = "x") -> list[dict[str, Any]]:
    line = (letter * 63 + "\n") * (CHUNK // 64)
    return [
        {"task_id": task_id, "offset": o, "next_offset": o + CHUNK, "data": line}
        for o in range(start, start + count * CHUNK, CHUNK)
    ]


async def org_bytes(cluster: Cluster, org: str) -> tuple[int, int]:
    """(the org's counter, the bytes of its chunks counted afresh)."""
    async with cluster.sessionmaker() as session:
        org_id = await session.scalar(select(Org.id).where(Org.name == org))
        counter = await session.scalar(
            select(OrgLogBytes.bytes).where(OrgLogBytes.org_id == org_id)
        )
        actual = await session.scalar(
            select(func.coalesce(func.sum(func.length(cast(LogChunk.data, LargeBinary))), 0))
            .join(Task, Task.id == LogChunk.task_id)
            .join(Job, Job.id == Task.job_id)
            .where(Job.org_id == org_id)
        )
    return int(counter or 0), int(actual or 0)


async def start(cluster: Cluster, org: str, jobs: int) -> tuple[str, str, list[tuple[int, int]]]:
    """A node's credential, a member's token and (job id, task id) of `jobs` running jobs."""
    token = await cluster.user_token(org)
    cred = (await cluster.register(await cluster.join_token(), gpus=jobs))["credential"]
    ids = [(await cluster.submit(token, gpus_per_node=1))["id"] for _ in range(jobs)]
    await cluster.cycle()
    started = (await cluster.heartbeat(cred))["start"]
    pairs = sorted((int(s["job_id"]), int(s["task_id"])) for s in started)
    assert [job for job, _ in pairs] == sorted(ids)
    await cluster.heartbeat(cred, tasks=[report(t, j, "running") for j, t in pairs])
    return cred, token, pairs


async def read(cluster: Cluster, token: str, job_id: int, query: str = "offset=0") -> Any:
    return await cluster.call("GET", f"/v1/jobs/{job_id}/logs?{query}", token)


async def test_the_oldest_ended_logs_go_first_then_new_output_is_dropped(cluster: Cluster) -> None:
    org, other = await cluster.org(guaranteed=8), await cluster.org(guaranteed=8)
    cred, token, [(j1, t1), (j2, t2), (j3, t3)] = await start(cluster, org, 3)
    other_cred, other_token, [(oj, ot)] = await start(cluster, other, 1)
    # The other org keeps as much as the whole budget: it is never touched by this org's.
    await cluster.heartbeat(other_cred, logs=chunks(ot, 0, 10, "o"))

    await cluster.heartbeat(cred, logs=chunks(t1, 0, 3) + chunks(t2, 0, 3))
    await cluster.heartbeat(cred, tasks=[report(t1, j1, "exited", exit_code=0)])
    await cluster.heartbeat(cred, tasks=[report(t2, j2, "exited", exit_code=0)])
    assert await org_bytes(cluster, org) == (6 * CHUNK, 6 * CHUNK)

    # 6 + 6 chunks is past 10: the task that ended first loses its whole log, the other stays.
    await cluster.heartbeat(cred, logs=chunks(t3, 0, 6))
    assert await org_bytes(cluster, org) == (9 * CHUNK, 9 * CHUNK)
    dropped = await read(cluster, token, j1)
    assert "deleted on the server for its org's log budget" in dropped["data"]
    assert dropped["eof"] is True
    assert len((await read(cluster, token, j2))["data"]) == 3 * CHUNK
    # A late resend of the dropped task's output does not bring it back.
    await cluster.heartbeat(cred, logs=chunks(t1, 3 * CHUNK, 1))
    assert await org_bytes(cluster, org) == (9 * CHUNK, 9 * CHUNK)

    # Then the second ended task's log; then only the running task is left: its output past
    # the budget is dropped, once marked, and what came before stays readable.
    await cluster.heartbeat(cred, logs=chunks(t3, 6 * CHUNK, 6))
    assert "log budget" in (await read(cluster, token, j2))["data"]
    await cluster.heartbeat(cred, logs=chunks(t3, 12 * CHUNK, 4))
    counter, actual = await org_bytes(cluster, org)
    assert counter == actual == 10 * CHUNK + len(BUDGET_MARKER)
    whole = await read(cluster, token, j3)
    assert whole["data"] == chunks(t3, 0, 1)[0]["data"] * 10 + BUDGET_MARKER
    assert whole["next_offset"] == 16 * CHUNK
    tail = await read(cluster, token, j3, f"tail={CHUNK}")
    assert tail["data"] == BUDGET_MARKER

    # The other org's log is whole.
    assert await org_bytes(cluster, other) == (10 * CHUNK, 10 * CHUNK)
    assert (await read(cluster, other_token, oj))["data"] == chunks(ot, 0, 1, "o")[0]["data"] * 10

    # The retention's deletions come off the counter too.
    await cluster.heartbeat(cred, tasks=[report(t3, j3, "exited", exit_code=0)])
    await LogRetention(retention_s=1.0).run_pass(
        cluster.sessionmaker, now=utcnow() + timedelta(days=1)
    )
    assert await org_bytes(cluster, org) == (0, 0)


async def test_two_nodes_of_one_org_keep_the_counter_exact(database_url: str) -> None:
    """Both nodes' heartbeats at once (concurrent transactions on PostgreSQL) add to one row."""
    settings = fast_settings(database_url, org_log_max_bytes=0, task_log_max_bytes=1 << 20)
    async with running_cluster(settings) as cluster:
        org = await cluster.org(guaranteed=16)
        (a, _, [(_, ta)]), (b, _, [(_, tb)]) = [await start(cluster, org, 1) for _ in range(2)]

        async def ship(cred: str, task: int) -> None:
            for n in range(12):
                await cluster.heartbeat(cred, logs=chunks(task, n * 2 * CHUNK, 2))

        await asyncio.gather(ship(a, ta), ship(b, tb))
        assert await org_bytes(cluster, org) == (48 * CHUNK, 48 * CHUNK)


async def test_a_heartbeat_waiting_on_another_making_room_counts_the_room_it_made(
    cluster: Cluster,
) -> None:
    """Two heartbeats of one org past the budget at once both pick its oldest ended log. The
    second waits on the first's deletion (PostgreSQL's row locks; SQLite takes them in turn)
    and finds it gone: the room the first made is there for both, so no other log is deleted
    and none of the second's output is dropped."""
    org = await cluster.org(guaranteed=16)
    a, token, [(j1, t1), (j2, t2), (_, t3)] = await start(cluster, org, 3)
    b, _, [(_, t4)] = await start(cluster, org, 1)
    await cluster.heartbeat(a, logs=chunks(t1, 0, 2) + chunks(t2, 0, 2) + chunks(t3, 0, 6))
    for job, task in ((j1, t1), (j2, t2)):
        await cluster.heartbeat(a, tasks=[report(task, job, "exited", exit_code=0)])
    assert await org_bytes(cluster, org) == (BUDGET, BUDGET)
    async with cluster.sessionmaker() as session:
        node_a = await session.scalar(select(Task.node_id).where(Task.id == t3))
    assert node_a is not None

    async with cluster.sessionmaker() as first:
        # Node a's heartbeat deletes the oldest ended log (t1's) to make room, uncommitted.
        body = Heartbeat.model_validate({"logs": chunks(t3, 6 * CHUNK, 1)})
        await heartbeat(first, node_id=node_a, body=body, settings=cluster.app.state.settings)
        second = asyncio.create_task(cluster.heartbeat(b, logs=chunks(t4, 0, 1)))
        await done_or_waiting(cluster.app.state.engine, second)
        await first.commit()
    await asyncio.wait_for(second, timeout=120)

    assert await org_bytes(cluster, org) == (BUDGET, BUDGET)
    assert "log budget" in (await read(cluster, token, j1))["data"]
    assert (await read(cluster, token, j2))["data"] == chunks(t2, 0, 1)[0]["data"] * 2
    async with cluster.sessionmaker() as session:
        stored = await session.scalars(select(LogChunk.data).where(LogChunk.task_id == t4))
        assert list(stored) == [chunks(t4, 0, 1)[0]["data"]]


async def test_two_nodes_making_room_at_once_keep_the_counter_exact(cluster: Cluster) -> None:
    """Both nodes' heartbeats delete the org's ended logs at once (on PostgreSQL, concurrent
    transactions that may pick the same task): each byte comes off the counter once."""
    org = await cluster.org(guaranteed=16)
    a, token, [(j1, t1), (j2, t2), (j3, t3), (_, t4)] = await start(cluster, org, 4)
    b, _, [(_, t5)] = await start(cluster, org, 1)
    await cluster.heartbeat(a, logs=chunks(t1, 0, 2) + chunks(t2, 0, 2) + chunks(t3, 0, 2))
    for job, task in ((j1, t1), (j2, t2), (j3, t3)):
        await cluster.heartbeat(a, tasks=[report(task, job, "exited", exit_code=0)])

    async def ship(cred: str, task: int) -> None:
        for n in range(8):
            await cluster.heartbeat(cred, logs=chunks(task, n * CHUNK, 1))

    await asyncio.gather(ship(a, t4), ship(b, t5))
    counter, actual = await org_bytes(cluster, org)
    assert counter == actual
    # Each heartbeat decides from the counter as it was when it began: the two at once may
    # both take the last room, so the org can end up past the budget by one heartbeat's chunk.
    assert BUDGET < actual <= BUDGET + CHUNK + 2 * len(BUDGET_MARKER)
    for job in (j1, j2, j3):
        assert "log budget" in (await read(cluster, token, job))["data"]
