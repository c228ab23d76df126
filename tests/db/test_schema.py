"""What the database itself refuses or keeps, whatever the code above it does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Allocation, Job, Quota
from tests import factories as f


async def test_a_gpu_cannot_be_held_by_two_open_allocations(session: AsyncSession) -> None:
    o = await f.org(session)
    u = await f.user(session, o)
    n, gpus = await f.node(session, gpus=2)
    first = await f.job(session, o, u)
    second = await f.job(session, o, u)
    await f.running_task(session, first, n, gpus[:1])
    await session.commit()
    held = (first.id, gpus[0].id)

    with pytest.raises(IntegrityError):
        await f.running_task(session, second, n, gpus[:1])
    await session.rollback()

    # What was stored before the refused write is still there, intact.
    open_allocs = (
        await session.scalars(select(Allocation).where(Allocation.ended_at.is_(None)))
    ).all()
    assert [(a.job_id, a.gpu_id) for a in open_allocs] == [held]


async def test_a_gpu_is_free_again_once_its_allocation_ends(session: AsyncSession) -> None:
    o = await f.org(session)
    u = await f.user(session, o)
    n, gpus = await f.node(session, gpus=1)
    first = await f.job(session, o, u)
    second = await f.job(session, o, u)
    await f.running_task(session, first, n, gpus)
    await session.execute(
        update(Allocation).where(Allocation.job_id == first.id).values(ended_at=datetime.now(UTC))
    )
    await f.running_task(session, second, n, gpus)
    await session.commit()
    count = len((await session.scalars(select(Allocation))).all())
    assert count == 2


async def test_idempotency_key_is_unique_per_user(session: AsyncSession) -> None:
    o = await f.org(session)
    alice = await f.user(session, o)
    bob = await f.user(session, o)
    await f.job(session, o, alice, idempotency_key="k1")
    await f.job(session, o, bob, idempotency_key="k1")  # another user may reuse a key
    await f.job(session, o, alice)  # no key: never collides
    await f.job(session, o, alice)
    await session.commit()
    with pytest.raises(IntegrityError):
        await f.job(session, o, alice, idempotency_key="k1")


async def test_timestamps_come_back_timezone_aware_utc(session: AsyncSession) -> None:
    o = await f.org(session)
    u = await f.user(session, o)
    paris = timezone(timedelta(hours=1))
    submitted = datetime(2026, 3, 1, 13, 0, tzinfo=paris)
    j = await f.job(session, o, u, submitted_at=submitted)
    await session.commit()
    session.expunge_all()
    stored = await session.scalar(select(Job.submitted_at).where(Job.id == j.id))
    assert stored == submitted
    assert stored is not None
    assert stored.utcoffset() == timedelta(0)


async def test_naive_timestamps_are_refused(session: AsyncSession) -> None:
    o = await f.org(session)
    u = await f.user(session, o)
    with pytest.raises(StatementError, match="naive datetime"):
        await f.job(session, o, u, submitted_at=datetime(2026, 3, 1, 13, 0))


async def test_quota_limit_below_guarantee_is_refused(session: AsyncSession) -> None:
    o = await f.org(session)
    session.add(Quota(org_id=o.id, gpu_type="H100", guaranteed=8, limit=4))
    with pytest.raises(IntegrityError):
        await session.flush()
