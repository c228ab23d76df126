"""Log retention: the log chunks of tasks that ended longer ago than `task_log_retention_s`
are deleted by the scheduler leader, a bounded batch per transaction, never by a request.

Tasks are found through `ix_tasks_ended_at`; `LogRetention` remembers up to when everything
has been deleted, so that each pass looks only at tasks that ended since the last complete one
(the first pass after a start looks at them all once).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scheduler.db import LogChunk, Task
from scheduler.db.types import utcnow
from scheduler.services.batches import Batch, Transactions
from scheduler.services.logbudget import delete_chunks

BATCH_CHUNKS = 1_000  # chunks deleted per transaction (each up to 64 Ki characters)
MAX_BATCHES_PER_PASS = 20  # the rest waits for the next pass: a pass never holds up a cycle


async def delete_expired_chunks(
    session: AsyncSession, *, ended_before: datetime, ended_since: datetime | None, limit: int
) -> int:
    """Delete up to `limit` chunks of tasks that ended in [ended_since, ended_before)."""
    tasks = select(Task.id).where(Task.ended_at < ended_before)
    if ended_since is not None:
        tasks = tasks.where(Task.ended_at >= ended_since)
    chunks = select(LogChunk.id).where(LogChunk.task_id.in_(tasks)).limit(limit)
    rows, _bytes = await delete_chunks(session, LogChunk.id.in_(chunks))
    return rows


@dataclass
class LogRetention:
    """One leader's passes; `done_until`: every chunk of a task that ended before it is gone."""

    retention_s: float
    done_until: datetime | None = None

    async def run_pass(
        self, sessionmaker: async_sessionmaker[AsyncSession], now: datetime | None = None
    ) -> int:
        """Delete expired chunks, at most MAX_BATCHES_PER_PASS batches; returns how many."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.retention_s)
        deleted = 0

        async def step(session: AsyncSession) -> Batch:
            nonlocal deleted
            count = await delete_expired_chunks(
                session, ended_before=cutoff, ended_since=self.done_until, limit=BATCH_CHUNKS
            )
            deleted += count
            if count == BATCH_CHUNKS:
                return Batch(more=True)
            return Batch(more=False, committed=lambda: setattr(self, "done_until", cutoff))

        await Transactions(MAX_BATCHES_PER_PASS).run(sessionmaker, step)
        return deleted
