"""A log read says `eof` only when no more of the task's log will come: the agent sent the last
chunk of the ended task, or it cannot any more. A task's end can reach the server before its
log's tail, and a follower (`fairgpu logs -f`, `run --jupyter`) that stopped at the end alone
missed the last lines (the job's own error message among them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from scheduler.db import Task
from tests.scheduling.harness import Cluster, fast_settings, now, report, running_cluster


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url)) as c:
        yield c


def chunk(task_id: int, offset: int, data: str, *, eof: bool = False) -> dict[str, Any]:
    size = len(data.encode())
    return {"task_id": task_id, "offset": offset, "next_offset": offset + size, "data": data,
            "eof": eof}  # fmt: skip


async def ended_task(cluster: Cluster) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(agent credential, user token, job, task report): a job whose one task has exited and
    whose log has not been sent yet."""
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    node = await cluster.register(await cluster.join_token())
    cred = node["credential"]
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    started = report(spec["task_id"], job["id"], "running", started_at=now().isoformat())
    await cluster.heartbeat(cred, tasks=[started])
    done = report(spec["task_id"], job["id"], "exited", exit_code=1, ended_at=now().isoformat())
    return cred, token, job, done


async def read(cluster: Cluster, token: str, job: dict[str, Any], offset: int) -> dict[str, Any]:
    path = f"/v1/jobs/{job['id']}/logs?offset={offset}"
    piece: dict[str, Any] = await cluster.call("GET", path, token)
    return piece


async def test_an_ended_tasks_log_is_whole_only_once_the_agent_says_so(cluster: Cluster) -> None:
    cred, token, job, done = await ended_task(cluster)
    task_id = done["task_id"]
    await cluster.heartbeat(cred, tasks=[done], logs=[chunk(task_id, 0, "epoch 1\n")])
    assert (await cluster.job(token, job["id"]))["state"] == "FAILED"
    first = await read(cluster, token, job, 0)
    assert (first["data"], first["eof"]) == ("epoch 1\n", False)  # the tail is still to come
    # The tail, the last chunk, arrives in the next heartbeat.
    await cluster.heartbeat(cred, logs=[chunk(task_id, 8, "CUDA error: out of memory\n", eof=True)])
    rest = await read(cluster, token, job, first["next_offset"])
    assert (rest["data"], rest["eof"]) == ("CUDA error: out of memory\n", True)
    # A resend of the last chunk (its reply lost) changes nothing.
    await cluster.heartbeat(cred, logs=[chunk(task_id, 8, "CUDA error: out of memory\n", eof=True)])
    assert (await read(cluster, token, job, 0))["data"] == "epoch 1\nCUDA error: out of memory\n"


async def test_an_empty_last_chunk_ends_the_log(cluster: Cluster) -> None:
    """The agent's last chunk is empty when everything had gone out before the task ended."""
    cred, token, job, done = await ended_task(cluster)
    task_id = done["task_id"]
    await cluster.heartbeat(cred, logs=[chunk(task_id, 0, "all of it\n")])
    await cluster.heartbeat(cred, tasks=[done])
    assert (await read(cluster, token, job, 10))["eof"] is False
    await cluster.heartbeat(cred, logs=[chunk(task_id, 10, "", eof=True)])
    whole = await read(cluster, token, job, 0)
    assert (whole["data"], whole["eof"]) == ("all of it\n", True)


async def test_a_log_the_agent_never_finishes_ends_after_a_while(cluster: Cluster) -> None:
    """An agent that lost the file or went away never sends the last chunk: a minute after
    the task's end the log counts as whole, so followers do not wait forever."""
    cred, token, job, done = await ended_task(cluster)
    await cluster.heartbeat(cred, tasks=[done], logs=[chunk(done["task_id"], 0, "partial\n")])
    assert (await read(cluster, token, job, 0))["eof"] is False
    async with cluster.sessionmaker() as session, session.begin():
        await session.execute(
            update(Task)
            .where(Task.id == done["task_id"])
            .values(ended_at=now() - timedelta(seconds=61))
        )
    assert (await read(cluster, token, job, 0))["eof"] is True


async def test_a_running_tasks_log_is_never_whole(cluster: Cluster) -> None:
    """An eof from an agent for a task the server still sees running is not the end."""
    cred, token, job, done = await ended_task(cluster)
    await cluster.heartbeat(cred, logs=[chunk(done["task_id"], 0, "still going\n", eof=True)])
    assert (await cluster.job(token, job["id"]))["state"] == "RUNNING"
    assert (await read(cluster, token, job, 0))["eof"] is False
