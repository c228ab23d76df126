"""The invariant checker finds each kind of violation, and passes a consistent database."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Allocation, Quota, Task, UsageRecord
from scheduler.db.types import utcnow
from scheduler.services.invariants import check_invariants
from tests import factories as f


async def _running_job(session: AsyncSession, gpus: int = 2):  # type: ignore[no-untyped-def]
    o = await f.org(session)
    u = await f.user(session, o)
    n, gpu_rows = await f.node(session, gpus=gpus)
    j = await f.job(session, o, u, state=JobState.RUNNING, gpus_per_node=gpus)
    await f.running_task(session, j, n, gpu_rows)
    return o, u, n, gpu_rows, j


async def test_consistent_database_passes(session: AsyncSession) -> None:
    await _running_job(session)
    await session.commit()
    report = await check_invariants(session)
    assert report.violations == []
    assert report.checked["jobs"] == 1


async def test_terminal_job_holding_gpus_is_reported(session: AsyncSession) -> None:
    *_, j = await _running_job(session)
    j.state = JobState.COMPLETED
    await session.commit()
    report = await check_invariants(session)
    assert any(f"job {j.id} is COMPLETED but holds 2 GPU(s)" in v for v in report.violations)


async def test_org_over_its_limit_is_reported_through_the_tree(session: AsyncSession) -> None:
    parent = await f.org(session)
    child = await f.org(session, parent_id=parent.id)
    u = await f.user(session, child)
    n, gpus = await f.node(session, gpus=4)
    j = await f.job(session, child, u, state=JobState.RUNNING, gpus_per_node=4)
    await f.running_task(session, j, n, gpus)
    session.add(Quota(org_id=parent.id, gpu_type="H100", guaranteed=0, limit=2))
    await session.commit()
    report = await check_invariants(session)
    assert any(f"org {parent.id} holds 4 H100 GPUs, limit 2" in v for v in report.violations)


async def test_ledger_must_equal_allocation_intervals(session: AsyncSession) -> None:
    o, u, _n, _g, j = await _running_job(session, gpus=1)
    allocation = (await session.execute(Allocation.__table__.select())).first()
    assert allocation is not None
    start = utcnow() - timedelta(hours=2)
    end = start + timedelta(seconds=3600)
    await session.execute(update(Allocation).values(started_at=start, ended_at=end))
    j.state = JobState.COMPLETED
    await session.execute(update(Task).values(state=JobState.COMPLETED, ended_at=end))
    session.add(
        UsageRecord(
            allocation_id=allocation.id,
            org_id=o.id,
            user_id=u.id,
            job_id=j.id,
            gpu_type="H100",
            period_start=start,
            gpu_seconds_allocated=3000.0,
        )
    )
    await session.commit()
    report = await check_invariants(session)
    assert report.violations == [
        f"allocation {allocation.id}: ledger 3000.0 GPU-s, interval 3600.0 s"
    ]


async def test_half_applied_gang_is_reported(session: AsyncSession) -> None:
    """A job RUNNING on fewer nodes (tasks) than it asked for: a start applied by halves."""
    *_, j = await _running_job(session, gpus=2)
    j.num_nodes = 2
    await session.commit()
    report = await check_invariants(session)
    assert any(
        f"job {j.id} is RUNNING with 1 task(s) in attempt 0, 2 node(s) asked" in v
        for v in report.violations
    ), report.violations


async def test_task_holding_fewer_gpus_than_asked_is_reported(session: AsyncSession) -> None:
    *_, j = await _running_job(session, gpus=2)
    j.gpus_per_node = 3
    await session.commit()
    report = await check_invariants(session)
    assert any("holds 2 GPU(s), the job asks 3 per node" in v for v in report.violations)


async def test_ended_task_still_holding_gpus_is_reported(session: AsyncSession) -> None:
    _o, _u, _n, _g, j = await _running_job(session, gpus=1)
    task = (await session.execute(Task.__table__.select())).first()
    assert task is not None
    await session.execute(update(Task).values(state=JobState.FAILED))
    await session.commit()
    report = await check_invariants(session)
    assert any(f"task {task.id} is FAILED but holds a GPU" in v for v in report.violations)


async def test_gpu_of_another_node_is_reported(session: AsyncSession) -> None:
    *_, j = await _running_job(session, gpus=1)
    other, _gpus = await f.node(session, gpus=1)
    await session.execute(update(Task).values(node_id=other.id))
    await session.commit()
    report = await check_invariants(session)
    assert any(f"on node {other.id} holds a GPU of node" in v for v in report.violations)
