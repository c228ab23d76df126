"""The ledger equals the allocation intervals; decayed usage folds incrementally, exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from protocol.states import JobState
from scheduler.core import decay_usage
from scheduler.core.types import UsageInterval
from scheduler.db import Allocation, OrgUsage, UsageRecord
from scheduler.db.engine import make_sessionmaker
from scheduler.services.accounting import (
    HeldInterval,
    SampleUsage,
    bucket_start,
    fold_usage,
    hour_buckets,
    record_sample_usage,
    settle_allocations,
    write_org_usage,
)
from scheduler.services.heartbeat.buffer import OpenAllocation
from scheduler.services.invariants import check_invariants
from scheduler.services.scheduling import Lease, run_cycle
from scheduler.settings import Settings
from tests import factories

T0 = datetime(2026, 11, 1, 10, 20, 30, tzinfo=UTC)
HALF_LIFE_S = 7 * 86_400.0


@given(st.floats(0, 10 * 86_400), st.floats(0, 3 * 86_400))
@settings(max_examples=60, deadline=None)
def test_hour_buckets_cover_the_interval_exactly(offset_s: float, length_s: float) -> None:
    start = T0 + timedelta(seconds=offset_s)
    end = start + timedelta(seconds=length_s)
    buckets = hour_buckets(start, end)
    assert sum(s for _, s in buckets) == pytest.approx((end - start).total_seconds(), abs=1e-6)
    assert all(b.minute == 0 and b.second == 0 and b.microsecond == 0 for b, _ in buckets)
    assert all(0 <= s <= 3600 for _, s in buckets)
    assert len({b for b, _ in buckets}) == len(buckets)


@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.floats(0, 50_000), st.floats(0, 50_000), st.booleans()),
        max_size=8,
    ),
    st.lists(st.floats(1, 40_000), min_size=1, max_size=5),
)
@settings(max_examples=60, deadline=None)
def test_incremental_fold_equals_one_fold(
    spans: list[tuple[int, float, float, bool]], steps: list[float]
) -> None:
    """Folding cycle by cycle (open allocations passed again each time) equals the core's fold
    of the finished history at the end."""
    now = 0.0
    ends = [now + sum(steps[: i + 1]) for i in range(len(steps))]
    intervals = [
        HeldInterval(i, org, "H100", start, start + length if closed else None)
        for i, (org, start, length, closed) in enumerate(spans)
    ]
    state: dict[int, tuple[float, float]] = {}
    for t in ends:
        visible = [iv for iv in intervals if iv.start <= t]
        folded = fold_usage(state, visible, t, half_life_s=HALF_LIFE_S, gpu_weights={})
        state = {org: (value, t) for org, value in folded.items()}
    final = ends[-1]
    expected = decay_usage(
        {},
        float("-inf"),
        [
            UsageInterval(
                iv.org_id, iv.gpu_type, 1, iv.start, iv.end if iv.end is not None else final
            )
            for iv in intervals
            if iv.start <= final
        ],
        final,
        half_life_s=HALF_LIFE_S,
    )
    for org in set(expected) | set(state):
        assert state.get(org, (0.0, 0.0))[0] == pytest.approx(
            expected.get(org, 0.0), rel=1e-6, abs=1e-6
        )


async def test_ledger_equals_allocation_intervals(session: AsyncSession) -> None:
    org = await factories.org(session)
    user = await factories.user(session, org)
    node, gpus = await factories.node(session, gpus=2)
    job = await factories.job(session, org, user, gpus_per_node=2)
    task = await factories.running_task(session, job, node, gpus)
    allocations = list(
        await session.scalars(select(Allocation).where(Allocation.task_id == task.id))
    )
    for i, alloc in enumerate(allocations):
        alloc.started_at = T0
        alloc.ended_at = T0 + timedelta(hours=2, minutes=10 * i, seconds=7)
    await session.flush()
    await settle_allocations(session, allocations, preempted=False, gpu_weights={"H100": 2.0})
    await settle_allocations(session, allocations, preempted=False, gpu_weights={"H100": 2.0})
    await session.commit()

    per_alloc = dict(
        (
            await session.execute(
                select(
                    UsageRecord.allocation_id, func.sum(UsageRecord.gpu_seconds_allocated)
                ).group_by(UsageRecord.allocation_id)
            )
        ).all()
    )
    for alloc in allocations:
        assert alloc.ended_at is not None
        assert per_alloc[alloc.id] == pytest.approx(
            (alloc.ended_at - alloc.started_at).total_seconds()
        )
    billed = await session.scalar(select(func.sum(UsageRecord.billed_gpu_seconds)))
    allocated = await session.scalar(select(func.sum(UsageRecord.gpu_seconds_allocated)))
    assert allocated is not None
    assert billed == pytest.approx(2.0 * allocated)
    assert (await session.scalar(select(func.count()).select_from(UsageRecord))) == 6
    report = await check_invariants(session)
    assert report.checked["closed_allocations"] == 2
    assert not [v for v in report.violations if "ledger" in v], report.violations


async def test_org_usage_upsert(session: AsyncSession) -> None:
    org = await factories.org(session)
    await write_org_usage(session, {org.id: 5.0}, T0)
    await write_org_usage(session, {org.id: 7.5}, T0 + timedelta(seconds=1))
    await session.commit()
    row = await session.get(OrgUsage, org.id)
    assert row is not None
    await session.refresh(row)
    assert row.decayed_gpu_seconds == 7.5
    assert row.as_of == T0 + timedelta(seconds=1)


async def test_open_allocations_reach_the_ledger_hourly(engine: AsyncEngine) -> None:
    maker = make_sessionmaker(engine)
    now = datetime.now(UTC)
    async with maker() as s:
        org = await factories.org(s)
        user = await factories.user(s, org)
        node, gpus = await factories.node(s, gpus=1)
        job = await factories.job(s, org, user, state=JobState.RUNNING)
        task = await factories.running_task(s, job, node, gpus)
        alloc = await s.scalar(select(Allocation).where(Allocation.task_id == task.id))
        assert alloc is not None
        alloc.started_at = now - timedelta(hours=1, minutes=30)
        await s.commit()
        alloc_id = alloc.id
    lease = Lease(engine, ttl_s=5.0)
    async with maker() as s:
        assert await lease.try_acquire(s)
    assert lease.epoch is not None
    settings = Settings(database_url=str(engine.url))
    hour = bucket_start(now)
    await run_cycle(
        maker, epoch=lease.epoch, settings=settings, previously_open=None, settle_until=hour
    )
    async with maker() as s:
        settled = await s.scalar(
            select(func.sum(UsageRecord.gpu_seconds_allocated)).where(
                UsageRecord.allocation_id == alloc_id
            )
        )
        alloc = await s.get(Allocation, alloc_id)
        assert alloc is not None
        assert settled == pytest.approx((hour - alloc.started_at).total_seconds())
        # Closing it settles the rest: the ledger equals the interval, nothing counted twice.
        alloc.ended_at = now
        await settle_allocations(s, [alloc], preempted=False, gpu_weights={})
        await s.commit()
        total = await s.scalar(
            select(func.sum(UsageRecord.gpu_seconds_allocated)).where(
                UsageRecord.allocation_id == alloc_id
            )
        )
    assert total == pytest.approx(90 * 60.0)
    await lease.release()


async def test_sample_usage_beyond_the_drivers_parameter_limit(session: AsyncSession) -> None:
    """One flush may carry thousands of ledger rows: more than asyncpg's 32,767 parameters
    in one statement (11 per row) once past about 3,000. All of them land."""
    org = await factories.org(session)
    user = await factories.user(session, org)
    node, gpus = await factories.node(session, gpus=1)
    job = await factories.job(session, org, user)
    task = await factories.running_task(session, job, node, gpus)
    alloc = await session.scalar(select(Allocation).where(Allocation.task_id == task.id))
    assert alloc is not None
    open_alloc = OpenAllocation(
        id=alloc.id,
        org_id=alloc.org_id,
        user_id=alloc.user_id,
        job_id=alloc.job_id,
        gpu_type=alloc.gpu_type,
        started_at=T0,
    )
    hours = 3_500  # 38,500 parameters as one multi-row statement
    usages = [
        SampleUsage(allocation=open_alloc, at=T0 + timedelta(hours=h), busy_s=1.5, energy_joules=2)
        for h in range(hours)
    ]
    await record_sample_usage(session, usages)
    await record_sample_usage(session, usages[:10])  # the same buckets again: added up
    await session.commit()
    rows, busy = (
        await session.execute(
            select(func.count(), func.sum(UsageRecord.gpu_seconds_busy)).where(
                UsageRecord.allocation_id == alloc.id
            )
        )
    ).one()
    assert rows == hours
    assert busy == pytest.approx(1.5 * (hours + 10))
