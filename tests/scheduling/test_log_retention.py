"""Log retention: the scheduler leader deletes the log chunks of tasks that ended longer ago
than `task_log_retention_s`, in bounded batches; running and recently ended tasks keep theirs."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol.states import JobState
from scheduler.db import LogChunk, Org, Task, User
from scheduler.services import logretention
from tests import factories
from tests.scheduling.harness import fast_settings, running_cluster


async def _task_with_log(
    session: AsyncSession, org: Org, user: User, *, ended_s_ago: float | None, chunks: int
) -> int:
    now = datetime.now(UTC)
    ended = None if ended_s_ago is None else now - timedelta(seconds=ended_s_ago)
    job = await factories.job(
        session,
        org,
        user,
        state=JobState.RUNNING if ended is None else JobState.COMPLETED,
        ended_at=ended,
    )
    task = Task(
        job_id=job.id,
        node_rank=0,
        state=JobState.RUNNING if ended is None else JobState.COMPLETED,
        ended_at=ended,
    )
    session.add(task)
    await session.flush()
    session.add_all(LogChunk(task_id=task.id, offset=i * 6, data="line!\n") for i in range(chunks))
    await session.flush()
    return task.id


async def _chunks(maker: async_sessionmaker[AsyncSession], task_id: int) -> int:
    async with maker() as session:
        return int(
            await session.scalar(
                select(func.count()).select_from(LogChunk).where(LogChunk.task_id == task_id)
            )
            or 0
        )


async def test_the_leader_deletes_expired_logs_in_batches(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logretention, "BATCH_CHUNKS", 4)
    monkeypatch.setattr(logretention, "MAX_BATCHES_PER_PASS", 2)
    # Ages far from the retention: a slow machine takes seconds between these steps, and a
    # "recent" log that had ended just 1 s before was once expired by the second pass.
    settings = fast_settings(database_url, task_log_retention_s=600.0, cycle_interval_s=60.0)
    async with running_cluster(settings) as cluster:
        maker = cluster.sessionmaker
        async with maker() as session:
            org = await factories.org(session)
            user = await factories.user(session, org)
            old = await _task_with_log(session, org, user, ended_s_ago=1200, chunks=10)
            recent = await _task_with_log(session, org, user, ended_s_ago=0, chunks=3)
            running = await _task_with_log(session, org, user, ended_s_ago=None, chunks=3)
            await session.commit()

        # The start-up pass recorded that what ended before its cutoff is gone; these rows were
        # written backdated after it, so the leader starts over.
        cluster.runtime.log_retention.done_until = None
        # One pass deletes at most BATCH_CHUNKS × MAX_BATCHES_PER_PASS chunks.
        assert await cluster.runtime.expire_logs() == 8
        assert await _chunks(maker, old) == 2
        # The next pass comes after a cycle once LOG_RETENTION_INTERVAL_S has passed.
        cluster.runtime.logs_expired_at = time.monotonic() - 3600
        await cluster.cycle()
        assert await _chunks(maker, old) == 0
        assert (await _chunks(maker, recent), await _chunks(maker, running)) == (3, 3)
        assert await cluster.runtime.expire_logs() == 0

        # The recent task's log goes once it is older than the retention.
        later = datetime.now(UTC) + timedelta(seconds=601)
        assert await cluster.runtime.log_retention.run_pass(maker, now=later) == 3
        assert await _chunks(maker, running) == 3
