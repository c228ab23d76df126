"""A cancel, a user's disabling or a quota cut that lands between a cycle's load and the end of
its apply.

The apply's seam (`apply.after_jobs_locked`) runs the other side at a fixed point: after the
apply has read the jobs it starts, before it writes them; a quota cut lands just before the
apply. Real SQLite file and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from protocol.states import JobState
from scheduler.db import Allocation, Event, Job, Org, Quota, Task, User
from scheduler.db.engine import make_sessionmaker
from scheduler.services import jobactions, orgs, users
from scheduler.services.scheduling import Lease, run_cycle
from scheduler.services.scheduling import apply as apply_module
from scheduler.services.scheduling import cycle as cycle_module
from scheduler.services.scheduling.apply import Applied
from scheduler.services.scheduling.cycle import CycleResult
from scheduler.settings import Settings
from tests import factories
from tests.harness.locks import done_or_waiting


async def _seed(engine: AsyncEngine) -> tuple[int, int, int]:
    """An org guaranteed 2 H100, a user, a node of 2 and a pending job of 2: (org, user, job)."""
    async with make_sessionmaker(engine)() as s:
        org = await factories.org(s)
        s.add(Quota(org_id=org.id, gpu_type="H100", guaranteed=2, limit=2))
        user = await factories.user(s, org)
        await factories.node(s, gpus=2)
        job = await factories.job(s, org, user, gpus_per_node=2)
        await s.commit()
        return org.id, user.id, job.id


@asynccontextmanager
async def _leader(engine: AsyncEngine) -> AsyncIterator[Callable[[], Awaitable[CycleResult]]]:
    """Hold the lease; yield a function that runs one cycle under it."""
    maker = make_sessionmaker(engine)
    settings = Settings(database_url=str(engine.url), lease_timeout_s=60.0)
    lease = Lease(engine, ttl_s=60.0)
    async with maker() as s:
        assert await lease.try_acquire(s)
    epoch = lease.epoch
    assert epoch is not None

    async def cycle() -> CycleResult:
        return await run_cycle(maker, epoch=epoch, settings=settings, previously_open=None)

    try:
        yield cycle
    finally:
        await lease.release()


async def _state(
    maker: async_sessionmaker[AsyncSession], job_id: int
) -> tuple[JobState, list[str | None], int]:
    """The job's state, its tasks' stop reasons and its open allocations."""
    async with maker() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        stops = list(await s.scalars(select(Task.stop_reason).where(Task.job_id == job_id)))
        held = await s.scalar(
            select(func.count())
            .select_from(Allocation)
            .where(Allocation.job_id == job_id, Allocation.ended_at.is_(None))
        )
        return job.state, stops, int(held or 0)


async def test_a_cancel_read_before_the_start_commits_stops_the_started_job(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel reads the job PENDING (as the route does), then the cycle starts it. The
    cancel must find it STARTING and stop its tasks: not overwrite STARTING with CANCELLED and
    leave the tasks on their GPUs, nor be overwritten by the start (a cancelled job started)."""
    _, _, job_id = await _seed(engine)
    maker = make_sessionmaker(engine)
    cancels: list[asyncio.Task[list[int]]] = []
    read = asyncio.Event()

    async def cancel_inside_the_apply() -> None:
        async def cancel() -> list[int]:
            async with maker() as s:
                job = await s.get(Job, job_id)  # what the route reads first
                read.set()
                assert job is not None
                assert job.state is JobState.PENDING
                # The write goes on while the apply continues: with the job locked it waits
                # for the apply's commit; without, it commits in the apply's window.
                nodes = await jobactions.cancel_job(
                    s, job, actor="user:test", reason="changed my mind", grace_s=1.0
                )
                await s.commit()
                return nodes

        cancels.append(asyncio.create_task(cancel()))
        # The read is the race's premise: on SQLite it goes through a thread and takes more
        # than one turn of the loop, so the apply must not commit before it has happened.
        await asyncio.wait_for(read.wait(), timeout=120)
        await done_or_waiting(engine, cancels[0])

    monkeypatch.setattr(apply_module, "after_jobs_locked", cancel_inside_the_apply)
    async with _leader(engine) as cycle:
        result = await cycle()
    (cancel,) = cancels
    nodes = await asyncio.wait_for(cancel, timeout=120)
    assert result.applied.started == [job_id]
    state, stops, held = await _state(maker, job_id)
    # Started, then cancelled: its tasks are asked to stop and its node is woken.
    assert (state, stops, held) == (JobState.STARTING, ["cancel"], 2)
    assert len(nodes) == 1


async def test_a_user_disabled_inside_the_apply_is_not_started_after_being_cancelled(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disabling cancels the user's pending jobs. Landing inside the apply, either it cancels
    the job and the apply skips it, or the apply starts it first and the disabling finds it
    running: never a job the disabling cancelled that the apply then starts."""
    _, user_id, job_id = await _seed(engine)
    maker = make_sessionmaker(engine)
    disables: list[asyncio.Task[int]] = []

    async def disable_inside_the_apply() -> None:
        async def disable() -> int:
            async with maker() as s:
                user = await s.get(User, user_id)
                assert user is not None
                cancelled = await users.disable_user(s, user, actor="admin:test")
                await s.commit()
                return cancelled

        disables.append(asyncio.create_task(disable()))
        await done_or_waiting(engine, disables[0])

    monkeypatch.setattr(apply_module, "after_jobs_locked", disable_inside_the_apply)
    async with _leader(engine) as cycle:
        result = await cycle()
    (disable,) = disables
    cancelled = await asyncio.wait_for(disable, timeout=120)
    state, stops, held = await _state(maker, job_id)
    async with maker() as s:
        moves = list(
            await s.execute(
                select(Event.from_state, Event.to_state)
                .where(Event.job_id == job_id, Event.kind == "job.state")
                .order_by(Event.id)
            )
        )
    if result.applied.started:
        # The apply went first: the job runs on, as a disabled user's running jobs do.
        assert (cancelled, state, stops, held) == (0, JobState.STARTING, [None], 2)
        assert [tuple(m) for m in moves][-1:] == [("PENDING", "STARTING")]
        assert ("PENDING", "CANCELLED") not in [tuple(m) for m in moves]
    else:
        assert (cancelled, state, stops, held) == (1, JobState.CANCELLED, [], 0)


@pytest.mark.parametrize("cut", ["org", "parent"])
async def test_a_quota_cut_inside_the_apply_holds_the_start(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    """The core decided on a limit of 2; the limit (the org's, or its parent's) is cut to 1
    before the apply writes: the start waits, and the next cycle says the org's limit holds it."""
    async with make_sessionmaker(engine)() as s:
        parent = await factories.org(s)
        s.add(Quota(org_id=parent.id, gpu_type="H100", guaranteed=2, limit=2))
        org = await factories.org(s, parent_id=parent.id)
        s.add(Quota(org_id=org.id, gpu_type="H100", guaranteed=2, limit=2))
        user = await factories.user(s, org)
        await factories.node(s, gpus=2)
        job = await factories.job(s, org, user, gpus_per_node=2)
        await s.commit()
        job_id, org_id, parent_id = job.id, org.id, parent.id
    maker = make_sessionmaker(engine)
    calls = 0
    real_apply = cycle_module._apply

    async def cut_then_apply(*args: Any, **kwargs: Any) -> Applied:
        """The cut commits after the core decided, before the apply begins (on SQLite the
        apply holds the write lock, so that is the only window; on PostgreSQL it is as late)."""
        nonlocal calls
        calls += 1
        if calls == 1:
            async with maker() as s:
                if cut == "org":
                    row = await s.get(Org, org_id)
                    assert row is not None
                    await orgs.set_quota(
                        s, row, gpu_type="H100", guaranteed=1, limit=1, actor="admin:test"
                    )
                else:  # the parent's row alone: the check reads the path, whatever set it
                    quota = await s.scalar(select(Quota).where(Quota.org_id == parent_id))
                    assert quota is not None
                    quota.guaranteed, quota.limit = 1, 1
                await s.commit()
        return await real_apply(*args, **kwargs)

    monkeypatch.setattr(cycle_module, "_apply", cut_then_apply)
    async with _leader(engine) as cycle:
        first = await cycle()
        assert calls == 1
        assert (first.applied.started, first.applied.skipped) == ([], [job_id])
        assert await _state(maker, job_id) == (JobState.PENDING, [], 0)
        second = await cycle()
    assert second.decisions is not None
    assert second.applied.started == []
    assert second.decisions.reasons[job_id].value == "OrgLimit"
