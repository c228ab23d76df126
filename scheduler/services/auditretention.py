"""Audit retention: events that belong to no job (users, tokens, orgs, nodes), tokens that
were revoked or expired, and users disabled, older than `audit_retention_s`, are deleted by
the scheduler leader in small batches (a short transaction each), never by a request.

A tenant can write all three at its change rate for as long as it likes (issue and revoke a
token, create and disable a user); jobs' own events have their own retention
(scheduler/services/jobretention.py). Nothing refers to a token row, and an event names its
actor by name, so deleting either loses only the old audit line itself. A disabled user is
deleted only once nothing names it: no job (ended jobs stay for accounting until the job purge)
and no usage rollup row (the purged jobs' usage, kept for ever); its name is then free for any
org, and its org has room under `max_user_rows_per_org` again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scheduler.db import ApiToken, Event, Job, UsageRollup, User
from scheduler.db.types import utcnow
from scheduler.services.batches import Batch, Transactions

BATCH_ROWS = 2_000  # rows deleted per transaction
MAX_BATCHES_PER_PASS = 5  # the rest waits for the next pass (a minute): it runs between cycles


async def delete_old_events(session: AsyncSession, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` events of no job from before `before` (through `ix_events_at`)."""
    old = select(Event.id).where(Event.at < before, Event.job_id.is_(None)).limit(limit)
    result = await session.execute(delete(Event).where(Event.id.in_(old)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def delete_dead_tokens(session: AsyncSession, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` tokens revoked, or expired, before `before`."""
    dead = (
        select(ApiToken.id)
        .where(or_(ApiToken.revoked_at < before, ApiToken.expires_at < before))
        .limit(limit)
    )
    result = await session.execute(delete(ApiToken).where(ApiToken.id.in_(dead)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def delete_disabled_users(session: AsyncSession, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` users disabled before `before` that no job and no usage rollup
    row names (their tokens go with them: ON DELETE CASCADE)."""
    owns_job = exists().where(Job.user_id == User.id)
    has_usage = exists().where(UsageRollup.org_id == User.org_id, UsageRollup.user_id == User.id)
    idle = (
        select(User.id)
        .where(User.disabled_at < before, ~owns_job, ~has_usage)
        .order_by(User.id)
        .limit(limit)
    )
    result = await session.execute(delete(User).where(User.id.in_(idle)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


@dataclass
class AuditRetention:
    """One leader's passes over audit rows older than `retention_s`."""

    retention_s: float

    async def run_pass(
        self, sessionmaker: async_sessionmaker[AsyncSession], now: datetime | None = None
    ) -> tuple[int, int, int]:
        """(events, tokens, users) deleted, at most MAX_BATCHES_PER_PASS transactions in all."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.retention_s)
        events = tokens = users = 0

        async def old_events(session: AsyncSession) -> Batch:
            nonlocal events
            count = await delete_old_events(session, before=cutoff, limit=BATCH_ROWS)
            events += count
            return Batch(more=count == BATCH_ROWS)

        async def dead_tokens(session: AsyncSession) -> Batch:
            nonlocal tokens
            count = await delete_dead_tokens(session, before=cutoff, limit=BATCH_ROWS)
            tokens += count
            return Batch(more=count == BATCH_ROWS)

        async def disabled_users(session: AsyncSession) -> Batch:
            nonlocal users
            count = await delete_disabled_users(session, before=cutoff, limit=BATCH_ROWS)
            users += count
            return Batch(more=count == BATCH_ROWS)

        transactions = Transactions(MAX_BATCHES_PER_PASS)  # the three share them
        await transactions.run(sessionmaker, old_events)
        await transactions.run(sessionmaker, dead_tokens)
        await transactions.run(sessionmaker, disabled_users)
        return events, tokens, users
