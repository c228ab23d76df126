"""Job purge: jobs that ended longer ago than `job_purge_after_s` go whole (row, tasks,
allocations, ledger, events) in bounded batches, after their ledger is summed into the usage
rollup, so usage reports read the same totals before and after; a job a live job still names
stays, and fair-share usage is untouched."""

from __future__ import annotations

import time
from dataclasses import astuple
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scheduler.db import (
    Allocation,
    Event,
    Job,
    JobDependency,
    OrgUsage,
    Task,
    UsageRecord,
    UsageRollup,
)
from scheduler.services import jobpurge
from scheduler.services.usage import UsageLine, usage_report
from tests import factories
from tests.scheduling.harness import fast_settings, running_cluster
from tests.scheduling.test_job_retention import _job_with_events

PURGE_S = 600.0


async def _reports(maker: async_sessionmaker[AsyncSession]) -> list[list[UsageLine]]:
    since = datetime.now(UTC) - timedelta(days=1)
    async with maker() as session:
        return [
            await usage_report(
                session,
                by=by,
                period=period,
                since=since,
                until=since + timedelta(days=2),
                org_ids=None,
            )
            for by in ("org", "user", "gpu_type")
            for period in ("day", "month")
        ]


def _same_totals(after: list[list[UsageLine]], before: list[list[UsageLine]]) -> None:
    """The same lines and totals; sums of floats grouped otherwise may differ in the last bit."""
    assert len(after) == len(before)
    for lines_after, lines_before in zip(after, before, strict=True):
        assert [(x.period_start, x.key) for x in lines_after] == [
            (x.period_start, x.key) for x in lines_before
        ]
        for x, y in zip(lines_after, lines_before, strict=True):
            assert astuple(x)[2:] == pytest.approx(astuple(y)[2:], rel=1e-12, abs=1e-9)


async def _fair_share(maker: async_sessionmaker[AsyncSession]) -> list[tuple[int, float]]:
    async with maker() as session:
        rows = await session.execute(
            select(OrgUsage.org_id, OrgUsage.decayed_gpu_seconds).order_by(OrgUsage.org_id)
        )
        return [(row[0], row[1]) for row in rows]


async def _count(maker: async_sessionmaker[AsyncSession], table: type, **where: object) -> int:
    async with maker() as session:
        stmt = select(func.count()).select_from(table)
        for name, value in where.items():
            column = getattr(table, name)
            stmt = stmt.where(column.in_(value) if isinstance(value, list) else column == value)
        return int(await session.scalar(stmt) or 0)


async def test_purged_jobs_leave_usage_reports_as_they_were(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobpurge, "BATCH_JOBS", 2)
    monkeypatch.setattr(jobpurge, "MAX_BATCHES_PER_PASS", 2)
    settings = fast_settings(
        database_url,
        job_purge_after_s=PURGE_S,
        job_detail_retention_s=10 * PURGE_S,
        cycle_interval_s=60.0,
    )
    async with running_cluster(settings) as cluster:
        maker = cluster.sessionmaker
        async with maker() as session:
            org = await factories.org(session)
            ada = await factories.user(session, org)
            bob = await factories.user(session, org)
            other_org = await factories.org(session)
            eve = await factories.user(session, other_org)
            # Five old jobs whose hours coincide: ada's three add to one rollup row.
            old = [
                await _job_with_events(session, org, user, ended_s_ago=1200 + i, events=2)
                for i, user in enumerate((ada, ada, bob, ada, eve))
            ]
            named = await _job_with_events(session, org, ada, ended_s_ago=1500, events=1)
            waiting = await factories.job(session, org, ada)
            session.add(JobDependency(job_id=waiting.id, depends_on_id=named))
            # Ended long ago by the server's account, yet a GPU not released: it stays.
            holding = await _job_with_events(session, org, bob, ended_s_ago=1600, events=1)
            session.add(
                Allocation(
                    task_id=(await session.scalar(select(Task.id).where(Task.job_id == holding))),
                    job_id=holding,
                    org_id=org.id,
                    user_id=bob.id,
                    gpu_type="H100",
                )
            )
            recent = await _job_with_events(session, org, bob, ended_s_ago=0, events=1)
            running = await _job_with_events(session, org, eve, ended_s_ago=None, events=1)
            await session.commit()
        before = await _reports(maker)
        ledger_before = await _count(maker, UsageRecord)
        ledger_of_old = await _count(maker, UsageRecord, job_id=old)
        assert ledger_of_old >= len(old)

        cluster.runtime.logs_expired_at = time.monotonic() + 3600  # no pass but those asked for
        fair_share = await _fair_share(maker)
        # Oldest first, two transactions of two: `holding` and `named` (which stay), then
        # four old jobs; then the fifth.
        assert await cluster.runtime.purge_jobs() == 2
        assert await cluster.runtime.purge_jobs() == 3
        assert await cluster.runtime.purge_jobs() == 0

        gone = old
        assert await _count(maker, Job, id=gone) == 0
        for table in (Task, Allocation, UsageRecord, Event):
            assert await _count(maker, table, job_id=gone) == 0, table
        kept = [named, holding, waiting.id, recent, running]
        assert await _count(maker, Job, id=kept) == 5
        assert await _count(maker, UsageRecord) == ledger_before - ledger_of_old
        # One rollup row per org, user, GPU type, hour and preempted: ada's three jobs share
        # theirs, so three users' rows, as many as one old job has ledger rows each.
        assert await _count(maker, UsageRollup) == 3 * ledger_of_old // len(old)
        _same_totals(await _reports(maker), before)
        assert await _fair_share(maker) == fair_share  # it decays org_usage, not the ledger
        registry = cluster.runtime.metrics.registry
        purged = registry.get_sample_value("fairgpu_retention_purged_rows_total", {"table": "jobs"})
        assert purged == 5

        # Once the job that names it has ended, the named job goes too, with the dependency.
        async with maker() as session:
            row = await session.get(Job, waiting.id)
            assert row is not None
            row.ended_at = datetime.now(UTC)
            await session.commit()
        cluster.runtime.job_purge.done_through = None  # as after a restart: look again
        assert await cluster.runtime.purge_jobs() == 1
        assert await _count(maker, Job, id=[named]) == 0
        assert await _count(maker, JobDependency) == 0
        _same_totals(await _reports(maker), before)
