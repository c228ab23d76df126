"""Job detail retention: the scheduler leader deletes the events, script and secrets of jobs
that ended longer ago than `job_detail_retention_s`, in bounded batches, leaving one counted
`job.purged` row per job; the job row, its tasks, allocations and the usage ledger stay, so
history and usage reports read the same before and after."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol.states import JobState
from scheduler.db import Allocation, Event, Job, JobDependency, Org, Task, UsageRecord, User
from scheduler.services import jobretention
from scheduler.services.accounting import settle_allocations
from scheduler.services.usage import usage_report
from tests import factories
from tests.scheduling.harness import fast_settings, running_cluster

RETENTION_S = 600.0


async def _job_with_events(
    session: AsyncSession, org: Org, user: User, *, ended_s_ago: float | None, events: int
) -> int:
    """A job (ended that long ago, or running) with `events` events, a script, a secret and
    one hour-long allocation settled in the ledger."""
    now = datetime.now(UTC)
    ended = None if ended_s_ago is None else now - timedelta(seconds=ended_s_ago)
    job = await factories.job(
        session,
        org,
        user,
        state=JobState.RUNNING if ended is None else JobState.COMPLETED,
        started_at=now - timedelta(hours=3),
        ended_at=ended,
        script="#!/bin/sh\necho secret plan\n",
        job_secret="s3cr3t",
        secret_env_ciphertext={"KEY": "token"},
    )
    task = Task(job_id=job.id, node_rank=0, state=job.state, ended_at=ended)
    session.add(task)
    await session.flush()
    start = now - timedelta(hours=3)
    alloc = Allocation(
        task_id=task.id,
        job_id=job.id,
        org_id=org.id,
        user_id=user.id,
        gpu_type="H100",
        started_at=start,
        ended_at=start + timedelta(hours=1),
    )
    session.add(alloc)
    await session.flush()
    await settle_allocations(session, [alloc], preempted=False, gpu_weights={"H100": 1.0})
    session.add_all(
        Event(
            at=now - timedelta(hours=3) + timedelta(seconds=i),
            kind="job.forward",
            job_id=job.id,
            org_id=org.id,
            actor="user:ada",
            reason=f"connection {i}",
        )
        for i in range(events)
    )
    await session.flush()
    return job.id


async def _events(maker: async_sessionmaker[AsyncSession], job_id: int) -> list[Event]:
    async with maker() as session:
        return list(
            await session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
        )


async def _ledger(maker: async_sessionmaker[AsyncSession]) -> tuple[float, int, int, int]:
    """The ledger's allocated seconds, and how many allocations, tasks and jobs there are."""
    async with maker() as session:
        seconds = await session.scalar(select(func.sum(UsageRecord.gpu_seconds_allocated)))
        counts = [
            int(await session.scalar(select(func.count()).select_from(t)) or 0)
            for t in (Allocation, Task, Job)
        ]
        return float(seconds or 0.0), counts[0], counts[1], counts[2]


async def test_the_leader_purges_expired_job_details_in_batches(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobretention, "BATCH_JOBS", 2)
    monkeypatch.setattr(jobretention, "BATCH_EVENTS", 4)
    monkeypatch.setattr(jobretention, "MAX_BATCHES_PER_PASS", 3)
    # Ages far from the retention, so that a slow machine's seconds between steps do not matter.
    settings = fast_settings(
        database_url, job_detail_retention_s=RETENTION_S, cycle_interval_s=60.0
    )
    async with running_cluster(settings) as cluster:
        maker = cluster.sessionmaker
        async with maker() as session:
            org = await factories.org(session)
            user = await factories.user(session, org)
            many = await _job_with_events(session, org, user, ended_s_ago=1200, events=10)
            few = [
                await _job_with_events(session, org, user, ended_s_ago=1100, events=1)
                for _ in range(3)
            ]
            recent = await _job_with_events(session, org, user, ended_s_ago=0, events=2)
            running = await _job_with_events(session, org, user, ended_s_ago=None, events=2)
            await session.commit()
        ledger = await _ledger(maker)
        async with maker() as session:
            since = datetime.now(UTC) - timedelta(days=1)
            report = await usage_report(
                session,
                by="user",
                period="day",
                since=since,
                until=since + timedelta(days=2),
                org_ids=None,
            )

        cluster.runtime.job_retention.done_through = None  # the rows were written backdated
        cluster.runtime.logs_expired_at = time.monotonic() + 3600  # no pass but those asked for
        # A pass runs at most 3 transactions of at most 4 events: the job with 10 needs three,
        # the third also takes the next job's one.
        assert await cluster.runtime.expire_job_details() == 11
        assert [e.kind for e in await _events(maker, many)] == ["job.purged"]
        assert [len(await _events(maker, j)) for j in few] == [1, 1, 1]
        # The next pass comes after a cycle, once LOG_RETENTION_INTERVAL_S has passed.
        cluster.runtime.logs_expired_at = time.monotonic() - 3600
        await cluster.cycle()
        for job_id in (many, *few):
            (purged,) = await _events(maker, job_id)
            assert purged.kind == "job.purged"
            count = 10 if job_id == many else 1
            assert purged.details is not None
            assert purged.details["count"] == count
            assert f"{count} events from " in (purged.reason or "")
        assert await cluster.runtime.expire_job_details() == 0
        registry = cluster.runtime.metrics.registry
        purged_total = "fairgpu_retention_purged_rows_total"
        assert registry.get_sample_value(purged_total, {"table": "events"}) == 13

        async with maker() as session:
            jobs = {
                j.id: j
                for j in await session.scalars(
                    select(Job).where(Job.id.in_([many, recent, running]))
                )
            }
            assert (await session.scalar(select(Job.script).where(Job.id == many))) is None
            assert jobs[many].job_secret is None
            assert jobs[many].secret_env_ciphertext is None
            assert jobs[many].state is JobState.COMPLETED  # what history shows stays
            assert jobs[recent].job_secret == "s3cr3t"
            assert jobs[running].secret_env_ciphertext == {"KEY": "token"}
            again = await usage_report(
                session,
                by="user",
                period="day",
                since=since,
                until=since + timedelta(days=2),
                org_ids=None,
            )
        assert again == report
        assert await _ledger(maker) == ledger  # the ledger equals its allocations still
        assert (len(await _events(maker, recent)), len(await _events(maker, running))) == (2, 2)

        # The recent job's details go once it is older than the retention; the running one's
        # never while it runs.
        later = datetime.now(UTC) + timedelta(seconds=RETENTION_S + 1)
        purged = await cluster.runtime.job_retention.run_pass(maker, now=later)
        assert (purged.events, purged.jobs) == (2, 1)
        assert len(await _events(maker, running)) == 2


async def test_jobs_that_never_started_are_deleted_whole_unless_another_names_them(
    database_url: str,
) -> None:
    """A loop of submit and cancel leaves job rows with no task, allocation or ledger row:
    past the retention they go whole; one that a dependency or its array's other elements
    still name stays (with its events purged), and a job that ran keeps its row."""
    settings = fast_settings(
        database_url, job_detail_retention_s=RETENTION_S, cycle_interval_s=60.0
    )
    async with running_cluster(settings) as cluster:
        maker = cluster.sessionmaker
        old = datetime.now(UTC) - timedelta(seconds=2 * RETENTION_S)
        async with maker() as session:
            org = await factories.org(session)
            user = await factories.user(session, org)
            ran = await _job_with_events(session, org, user, ended_s_ago=1200, events=1)

            async def cancelled(**kw: object) -> int:
                job = await factories.job(
                    session, org, user, state=JobState.CANCELLED, ended_at=old, **kw
                )
                session.add(Event(at=old, kind="job.state", job_id=job.id, actor="user:ada"))
                await session.flush()
                return job.id

            alone = await cancelled()
            named = await cancelled()
            waiting = await factories.job(session, org, user, state=JobState.PENDING)
            session.add(JobDependency(job_id=waiting.id, depends_on_id=named))
            head = await cancelled()
            await session.execute(update(Job).where(Job.id == head).values(array_job_id=head))
            element = await cancelled(array_job_id=head)
            await session.commit()
        ledger = await _ledger(maker)

        cluster.runtime.job_retention.done_through = None  # the rows were written backdated
        cluster.runtime.logs_expired_at = time.monotonic() + 3600
        assert await cluster.runtime.expire_job_details() == 5  # ran's 1 and the four's
        async with maker() as session:
            left = set(await session.scalars(select(Job.id)))
        assert left == {ran, named, head, waiting.id}  # alone and the element are gone
        assert {alone, element}.isdisjoint(left)
        assert [e.kind for e in await _events(maker, named)] == ["job.purged"]
        allocated, allocations, tasks, _ = await _ledger(maker)
        assert (allocated, allocations, tasks) == ledger[:3]  # nothing that ran was touched
        registry = cluster.runtime.metrics.registry
        assert (
            registry.get_sample_value("fairgpu_retention_purged_rows_total", {"table": "jobs"}) == 2
        )

        # Once its last element is gone, the array's head goes too (on a later pass: the
        # leader starts over after a restart).
        cluster.runtime.job_retention.done_through = None
        await cluster.runtime.expire_job_details()
        async with maker() as session:
            assert set(await session.scalars(select(Job.id))) == {ran, named, waiting.id}


async def test_a_new_leader_carries_on_from_the_stored_cursor(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cursor is written with each batch: a JobRetention of a restarted (or another)
    leader starts where the last one stopped instead of walking every ended job again."""
    monkeypatch.setattr(jobretention, "BATCH_JOBS", 2)
    settings = fast_settings(
        database_url, job_detail_retention_s=RETENTION_S, cycle_interval_s=60.0
    )
    async with running_cluster(settings) as cluster:
        maker = cluster.sessionmaker
        async with maker() as session:
            org = await factories.org(session)
            user = await factories.user(session, org)
            first = [
                await _job_with_events(session, org, user, ended_s_ago=age, events=1)
                for age in (1500, 1400, 1300)
            ]
            await session.commit()
        leader = jobretention.JobRetention(retention_s=RETENTION_S)
        assert (await leader.run_pass(maker)).events == 3
        assert leader.done_through is not None
        assert leader.done_through[1] == first[-1]

        async with maker() as session:
            # Behind the cursor (as a job whose details a pass deleted already would be,
            # were its events still there) and ahead of it.
            behind = await _job_with_events(session, org, user, ended_s_ago=1600, events=1)
            ahead = await _job_with_events(session, org, user, ended_s_ago=1200, events=1)
            await session.commit()
        successor = jobretention.JobRetention(retention_s=RETENTION_S)
        assert (await successor.run_pass(maker)).events == 1
        assert successor.done_through is not None
        assert successor.done_through[1] == ahead
        assert [e.kind for e in await _events(maker, ahead)] == ["job.purged"]
        assert [e.kind for e in await _events(maker, behind)] == ["job.forward"]
