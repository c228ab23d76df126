"""The server keeps at most `task_log_max_bytes` of a task's log: the latest output, with a marker
for what it dropped, and offset and tail reads that stay right."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from scheduler.db import LogChunk
from tests.scheduling.harness import Cluster, fast_settings, report, running_cluster

CAP_BYTES = 64 * 1024
CHUNK_BYTES = 4096


@pytest.fixture
async def cluster(database_url: str) -> AsyncIterator[Cluster]:
    async with running_cluster(fast_settings(database_url, task_log_max_bytes=CAP_BYTES)) as c:
        yield c


def flood(total_bytes: int) -> bytes:
    """Numbered lines, so that any slice of it says where it came from."""
    out = bytearray()
    line = 0
    while len(out) < total_bytes:
        out += f"line {line:07d} {'x' * 48}\n".encode()
        line += 1
    return bytes(out[:total_bytes])


def chunks(task_id: int, data: bytes, start: int, count: int) -> list[dict[str, Any]]:
    out = []
    for offset in range(start, min(len(data), start + count * CHUNK_BYTES), CHUNK_BYTES):
        piece = data[offset : offset + CHUNK_BYTES]
        out.append(
            {
                "task_id": task_id,
                "offset": offset,
                "next_offset": offset + len(piece),
                "data": piece.decode(),
            }
        )
    return out


async def stored(cluster: Cluster, task_id: int) -> tuple[int, int, int | None]:
    """(bytes of text, rows, first offset) the server holds for the task."""
    async with cluster.sessionmaker() as session:
        row = (
            await session.execute(
                select(
                    func.coalesce(func.sum(func.length(LogChunk.data)), 0),
                    func.count(),
                    func.min(LogChunk.offset),
                ).where(LogChunk.task_id == task_id)
            )
        ).one()
    return int(row[0]), int(row[1]), row[2]


async def _started_task(cluster: Cluster) -> tuple[str, str, dict[str, Any], int]:
    """A node's credential, a member's token, their one-GPU job and its task's id, the task
    handed to the node."""
    org = await cluster.org(guaranteed=8)
    token = await cluster.user_token(org)
    cred = (await cluster.register(await cluster.join_token()))["credential"]
    job = await cluster.submit(token, gpus_per_node=1)
    await cluster.cycle()
    (spec,) = (await cluster.heartbeat(cred))["start"]
    return cred, token, job, int(spec["task_id"])


async def test_a_flooding_task_keeps_the_latest_cap_on_the_server(cluster: Cluster) -> None:
    cred, token, job, task_id = await _started_task(cluster)
    await cluster.heartbeat(cred, tasks=[report(task_id, job["id"], "running")])

    data = flood(10 * CAP_BYTES + 1234)
    per_heartbeat = 8
    peak = 0
    for start in range(0, len(data), per_heartbeat * CHUNK_BYTES):
        await cluster.heartbeat(cred, logs=chunks(task_id, data, start, per_heartbeat))
        size, rows, _first = await stored(cluster, task_id)
        peak = max(peak, size)
        assert rows <= CAP_BYTES // CHUNK_BYTES + 1
    assert 0 < peak <= CAP_BYTES
    _size, _rows, first = await stored(cluster, task_id)
    assert first is not None
    assert first >= len(data) - CAP_BYTES

    # A resend of a chunk the server has dropped does not bring it back.
    await cluster.heartbeat(cred, logs=chunks(task_id, data, 0, 1))
    assert (await stored(cluster, task_id))[2] == first

    last = {"task_id": task_id, "offset": len(data), "next_offset": len(data), "data": "",
            "eof": True}  # fmt: skip
    await cluster.heartbeat(
        cred, tasks=[report(task_id, job["id"], "exited", exit_code=0)], logs=[last]
    )
    logs = f"/v1/jobs/{job['id']}/logs"
    tail = await cluster.call("GET", f"{logs}?tail=5000", token)
    assert tail["data"].encode() == data[-5000:]
    assert (tail["offset"], tail["next_offset"], tail["eof"]) == (len(data) - 5000, len(data), True)

    middle = len(data) - 20_000
    read = await cluster.call("GET", f"{logs}?offset={middle}", token)
    assert read["data"].encode() == data[middle:]

    # From the start: a marker for what the server dropped, then everything it kept.
    whole = await cluster.call("GET", f"{logs}?offset=0", token)
    marker = f"[fairgpu: {first} bytes of log dropped on the server (size cap)]\n"
    assert whole["data"] == marker + data[first:].decode()
    assert (whole["next_offset"], whole["eof"]) == (len(data), True)
    # A tail longer than what is kept starts with the marker for the part of it that is gone.
    longer = await cluster.call("GET", f"{logs}?tail={2 * CAP_BYTES}", token)
    gone = first - (len(data) - 2 * CAP_BYTES)
    assert longer["data"].startswith(f"[fairgpu: {gone} bytes of log dropped on the server")
    assert longer["data"].endswith(data[-100:].decode())


async def test_under_the_cap_nothing_is_dropped(cluster: Cluster) -> None:
    cred, token, job, task_id = await _started_task(cluster)
    data = flood(CAP_BYTES)
    await cluster.heartbeat(
        cred,
        tasks=[report(task_id, job["id"], "exited", exit_code=0)],
        logs=chunks(task_id, data, 0, CAP_BYTES // CHUNK_BYTES),
    )
    assert await stored(cluster, task_id) == (CAP_BYTES, CAP_BYTES // CHUNK_BYTES, 0)
    whole = await cluster.call("GET", f"/v1/jobs/{job['id']}/logs?offset=0", token)
    assert whole["data"].encode() == data
    assert whole["eof"] is True
