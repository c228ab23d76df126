"""A stale decision changes nothing, and a deposed leader's decisions are never applied."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from protocol.states import GpuHealth, JobState
from scheduler.core import schedule
from scheduler.core.types import Org, Start
from scheduler.db import Allocation, Gpu, Job, Node, Quota, SchedulerLease
from scheduler.db.engine import make_sessionmaker
from scheduler.services.scheduling import Lease, LeaseLost, run_cycle
from scheduler.services.scheduling import apply as apply_module
from scheduler.services.scheduling.apply import Applied, apply_starts
from scheduler.services.scheduling.lease import check_fence
from scheduler.services.scheduling.load import load_snapshot
from scheduler.settings import Settings
from tests import factories


async def _seed(engine: AsyncEngine) -> tuple[int, list[int]]:
    async with make_sessionmaker(engine)() as s:
        org = await factories.org(s)
        s.add(Quota(org_id=org.id, gpu_type="H100", guaranteed=2, limit=2))
        user = await factories.user(s, org)
        _, gpus = await factories.node(s, gpus=2)
        job = await factories.job(s, org, user, gpus_per_node=2)
        await s.commit()
        return job.id, [g.id for g in gpus]


async def _decide(engine: AsyncEngine) -> tuple[tuple[Start, ...], dict[int, Org]]:
    settings = Settings(database_url="sqlite:///unused.db")
    async with make_sessionmaker(engine)() as s:
        loaded = await load_snapshot(
            s,
            now=datetime.now(UTC),
            config=settings.policy.to_policy_config(),
            previously_open=None,
        )
    return schedule(loaded.snapshot).starts, {o.id: o for o in loaded.snapshot.orgs}


async def _open_allocations(engine: AsyncEngine) -> int:
    async with make_sessionmaker(engine)() as s:
        count = await s.scalar(
            select(func.count()).select_from(Allocation).where(Allocation.ended_at.is_(None))
        )
        return int(count or 0)


@pytest.mark.parametrize("change", ["gpu-unhealthy", "job-cancelled", "job-held"])
async def test_stale_start_is_skipped(engine: AsyncEngine, change: str) -> None:
    job_id, gpu_ids = await _seed(engine)
    starts, orgs = await _decide(engine)
    assert [s.job_id for s in starts] == [job_id]
    maker = make_sessionmaker(engine)
    async with maker() as s:  # the world moves on while the core decides
        if change == "gpu-unhealthy":
            gpu = await s.get(Gpu, gpu_ids[1])
            assert gpu is not None
            gpu.health = GpuHealth.UNHEALTHY
        else:
            job = await s.get(Job, job_id)
            assert job is not None
            if change == "job-cancelled":
                job.state = JobState.CANCELLED
            else:
                job.held = True
        await s.commit()
    applied = Applied()
    async with maker() as s, s.begin():
        await apply_starts(s, starts, datetime.now(UTC), applied, {}, decided_on=orgs)
    assert applied.started == []
    assert applied.skipped == [job_id]
    assert await _open_allocations(engine) == 0


async def test_unique_index_is_the_last_line_of_defence(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the in-code guard is fooled, a GPU is never given twice."""
    job_id, _ = await _seed(engine)
    (start,), orgs = await _decide(engine)
    maker = make_sessionmaker(engine)
    async with maker() as s, s.begin():
        applied = Applied()
        await apply_starts(s, (start,), datetime.now(UTC), applied, {}, decided_on=orgs)
        assert applied.started == [job_id]
    # A guard that sees nothing held (as if another writer committed between its read and our
    # insert), and the same decision again for a job made startable again.
    real_check = apply_module._check
    monkeypatch.setattr(
        apply_module, "_check", lambda st, gpus, ready, taken: real_check(st, gpus, ready, set())
    )
    async with maker() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        job.state = JobState.PENDING
        await s.flush()
        with pytest.raises(IntegrityError):  # the batch fails whole; the cycle then retries
            await apply_starts(s, (start,), datetime.now(UTC), Applied(), {}, decided_on=orgs)
        await s.rollback()
    async with maker() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        job.state = JobState.PENDING
        await s.flush()
        applied = Applied()
        await apply_starts(
            s, (start,), datetime.now(UTC), applied, {}, decided_on=orgs, one_by_one=True
        )
        assert applied.skipped == [job_id]  # only that start is skipped; the session lives on
        assert applied.started == []
        await s.rollback()
    assert await _open_allocations(engine) == 2


async def test_deposed_leader_applies_nothing(engine: AsyncEngine) -> None:
    job_id, _ = await _seed(engine)
    maker = make_sessionmaker(engine)
    settings = Settings(database_url=str(engine.url), lease_timeout_s=5.0)
    old = Lease(engine, ttl_s=5.0)
    async with maker() as s:
        assert await old.try_acquire(s)
    epoch = old.epoch
    assert epoch is not None
    async with maker() as s:  # a new leader takes over and bumps the epoch
        row = await s.get(SchedulerLease, 1)
        assert row is not None
        row.epoch += 1
        await s.commit()
    with pytest.raises(LeaseLost):
        await run_cycle(maker, epoch=epoch, settings=settings, previously_open=None)
    assert await _open_allocations(engine) == 0
    async with maker() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        assert job.state is JobState.PENDING
        await s.rollback()
        with pytest.raises(LeaseLost):
            async with s.begin():
                await check_fence(s, epoch, now=datetime.now(UTC), ttl_s=5.0)
        # The current epoch passes and the cycle runs.
        result = await run_cycle(maker, epoch=epoch + 1, settings=settings, previously_open=None)
    assert result.applied.started == [job_id]
    await old.release()


@pytest.mark.parametrize("agent_restarts_unconfined", [False, True])
async def test_isolated_start_needs_a_node_still_strict_at_apply(
    engine: AsyncEngine, agent_restarts_unconfined: bool
) -> None:
    """The snapshot carries the requirement (inherited from the parent org) and the node's mode;
    a node whose agent restarted unconfined between load and apply takes no isolated job."""
    async with make_sessionmaker(engine)() as s:
        parent = await factories.org(s, require_isolation=True)
        org = await factories.org(s, parent_id=parent.id)
        s.add(Quota(org_id=parent.id, gpu_type="H100", guaranteed=2, limit=2))
        s.add(Quota(org_id=org.id, gpu_type="H100", guaranteed=2, limit=2))
        user = await factories.user(s, org)
        node, _ = await factories.node(s, gpus=2)
        node.isolation = "strict"
        job = await factories.job(s, org, user, gpus_per_node=2)
        await s.commit()
        job_id, node_id = job.id, node.id
    settings = Settings(database_url="sqlite:///unused.db")
    async with make_sessionmaker(engine)() as s:
        loaded = await load_snapshot(
            s,
            now=datetime.now(UTC),
            config=settings.policy.to_policy_config(),
            previously_open=None,
        )
    assert [j.needs_isolation for j in loaded.snapshot.pending] == [True]
    assert [n.strict_isolation for n in loaded.snapshot.nodes] == [True]
    starts = schedule(loaded.snapshot).starts
    assert [s.job_id for s in starts] == [job_id]
    maker = make_sessionmaker(engine)
    if agent_restarts_unconfined:
        async with maker() as s:
            row = await s.get(Node, node_id)
            assert row is not None
            row.isolation = "none"
            await s.commit()
    applied = Applied()
    async with maker() as s, s.begin():
        orgs = {o.id: o for o in loaded.snapshot.orgs}
        await apply_starts(s, starts, datetime.now(UTC), applied, {}, decided_on=orgs)
    if agent_restarts_unconfined:
        assert (applied.started, applied.skipped) == ([], [job_id])
        assert await _open_allocations(engine) == 0
    else:
        assert (applied.started, applied.skipped) == ([job_id], [])
        assert await _open_allocations(engine) == 2


@pytest.mark.parametrize("agent_restarts_older", [False, True])
async def test_a_signal_start_needs_a_node_still_capable_at_apply(
    engine: AsyncEngine, agent_restarts_older: bool
) -> None:
    """The snapshot carries the job's needs (`--signal`: signal) and the agent's capabilities; a
    node whose agent restarted older (none said) between load and apply takes no such job."""
    async with make_sessionmaker(engine)() as s:
        org = await factories.org(s)
        s.add(Quota(org_id=org.id, gpu_type="H100", guaranteed=2, limit=2))
        user = await factories.user(s, org)
        node, _ = await factories.node(s, gpus=2)
        node.capabilities = ["signal", "pty", "port-forward"]
        job = await factories.job(s, org, user, gpus_per_node=2)
        job.signal = "USR1@30"
        await s.commit()
        job_id, node_id = job.id, node.id
    settings = Settings(database_url="sqlite:///unused.db")
    async with make_sessionmaker(engine)() as s:
        loaded = await load_snapshot(
            s,
            now=datetime.now(UTC),
            config=settings.policy.to_policy_config(),
            previously_open=None,
        )
    assert [j.capabilities for j in loaded.snapshot.pending] == [frozenset({"signal"})]
    assert [n.capabilities for n in loaded.snapshot.nodes] == [frozenset({"signal", "pty"})]
    starts = schedule(loaded.snapshot).starts
    assert [s.job_id for s in starts] == [job_id]
    maker = make_sessionmaker(engine)
    if agent_restarts_older:
        async with maker() as s:
            row = await s.get(Node, node_id)
            assert row is not None
            row.capabilities = None
            await s.commit()
    applied = Applied()
    async with maker() as s, s.begin():
        orgs = {o.id: o for o in loaded.snapshot.orgs}
        await apply_starts(s, starts, datetime.now(UTC), applied, {}, decided_on=orgs)
    if agent_restarts_older:
        assert (applied.started, applied.skipped) == ([], [job_id])
        assert await _open_allocations(engine) == 0
    else:
        assert (applied.started, applied.skipped) == ([job_id], [])
        assert await _open_allocations(engine) == 2


@pytest.mark.parametrize("agent_restarts_smaller", [False, True])
async def test_a_mem_start_needs_a_node_whose_share_still_holds_it_at_apply(
    engine: AsyncEngine, agent_restarts_smaller: bool
) -> None:
    """The snapshot carries the job's `--mem` and the node's memory share per GPU; a node whose
    agent restarted with a share the job no longer fits in, between load and apply, takes no
    such job (its agent would refuse the task at start)."""
    async with make_sessionmaker(engine)() as s:
        org = await factories.org(s)
        s.add(Quota(org_id=org.id, gpu_type="H100", guaranteed=2, limit=2))
        user = await factories.user(s, org)
        node, _ = await factories.node(s, gpus=2)
        node.memory_per_gpu_bytes = 64 * 2**30
        job = await factories.job(s, org, user, gpus_per_node=2)
        job.memory_bytes = 100 * 2**30
        await s.commit()
        job_id, node_id = job.id, node.id
    settings = Settings(database_url="sqlite:///unused.db")
    async with make_sessionmaker(engine)() as s:
        loaded = await load_snapshot(
            s,
            now=datetime.now(UTC),
            config=settings.policy.to_policy_config(),
            previously_open=None,
        )
    assert [j.memory_bytes for j in loaded.snapshot.pending] == [100 * 2**30]
    assert [n.memory_per_gpu_bytes for n in loaded.snapshot.nodes] == [64 * 2**30]
    starts = schedule(loaded.snapshot).starts
    assert [s.job_id for s in starts] == [job_id]
    maker = make_sessionmaker(engine)
    if agent_restarts_smaller:
        async with maker() as s:
            row = await s.get(Node, node_id)
            assert row is not None
            row.memory_per_gpu_bytes = 32 * 2**30
            await s.commit()
    applied = Applied()
    async with maker() as s, s.begin():
        orgs = {o.id: o for o in loaded.snapshot.orgs}
        await apply_starts(s, starts, datetime.now(UTC), applied, {}, decided_on=orgs)
    if agent_restarts_smaller:
        assert (applied.started, applied.skipped) == ([], [job_id])
        assert await _open_allocations(engine) == 0
    else:
        assert (applied.started, applied.skipped) == ([job_id], [])
        assert await _open_allocations(engine) == 2
