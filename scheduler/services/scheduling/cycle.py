"""One scheduling cycle in dstack's three phases: load, decide with nothing open, apply fenced.

maintenance  (fenced write, only when there is something to do) node timeouts, drains,
             time limits
LOAD         one short read transaction → `Snapshot`
DECIDE       `Scheduler.schedule(snapshot)` in a worker thread, no session open; the caller's
             `Scheduler` keeps the node layout while no node changed
APPLY        one transaction: fence check → starts (guarded) → preemptions → pending
             reasons (bulk) → decayed usage
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scheduler.core import Scheduler
from scheduler.core.types import Decisions
from scheduler.db import Allocation
from scheduler.db.types import utcnow
from scheduler.services.accounting import settle_allocations, write_org_usage
from scheduler.services.scheduling import lifecycle
from scheduler.services.scheduling.apply import (
    Applied,
    apply_preemptions,
    apply_starts,
    write_pending,
)
from scheduler.services.scheduling.lease import check_fence
from scheduler.services.scheduling.load import Loaded, load_snapshot
from scheduler.services.scheduling.tasks import EndEffects
from scheduler.settings import Settings


@dataclass
class CycleResult:
    """What one cycle did, for the runtime (waking nodes) and the metrics."""

    at: datetime
    duration_s: float = 0.0
    load_s: float = 0.0
    decide_s: float = 0.0
    apply_s: float = 0.0
    loaded: Loaded | None = None
    decisions: Decisions | None = None
    applied: Applied = field(default_factory=Applied)
    lifecycle: EndEffects = field(default_factory=EndEffects)
    open_allocation_ids: frozenset[int] = frozenset()
    explained_all: bool = True  # every pending job's explanation was rewritten


async def run_maintenance(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    epoch: int,
    settings: Settings,
    now: datetime,
) -> EndEffects:
    async with sessionmaker() as session:
        work = await lifecycle.find_work(session, now=now, settings=settings)
        await session.rollback()
        if not work:
            return EndEffects()
        async with session.begin():
            await check_fence(session, epoch, now=now, ttl_s=settings.lease_timeout_s)
            return await lifecycle.apply_work(session, work, now=now, settings=settings)


# Open allocations are settled to the ledger once an hour, for the last complete hours; a
# longer gap (no leader for hours) is filled when the allocation closes.
SETTLE_LOOKBACK = timedelta(hours=2)


async def _settle_open(
    session: AsyncSession, settings: Settings, *, since: datetime, until: datetime
) -> None:
    allocations = list(
        await session.scalars(select(Allocation).where(Allocation.ended_at.is_(None)))
    )
    await settle_allocations(
        session,
        allocations,
        preempted=False,
        gpu_weights=dict(settings.policy.gpu_weights),
        since=since,
        until=until,
    )


async def _apply(
    sessionmaker: async_sessionmaker[AsyncSession],
    loaded: Loaded,
    decisions: Decisions,
    epoch: int,
    settings: Settings,
    now: datetime,
    everything: bool,
    settle_until: datetime | None,
    *,
    one_by_one: bool = False,
) -> Applied:
    applied = Applied()
    async with sessionmaker() as session, session.begin():
        await check_fence(session, epoch, now=now, ttl_s=settings.lease_timeout_s)
        await apply_starts(
            session,
            decisions.starts,
            now,
            applied,
            loaded.org_names,
            decided_on={org.id: org for org in loaded.snapshot.orgs},
            one_by_one=one_by_one,
        )
        await apply_preemptions(
            session,
            decisions.preemptions,
            now,
            settings.policy.preemption_grace_s,
            applied,
            max_grace_s=settings.policy.max_preemption_grace_s,
        )
        await write_org_usage(session, loaded.org_usage, now)
        if settle_until is not None:
            await _settle_open(
                session, settings, since=settle_until - SETTLE_LOOKBACK, until=settle_until
            )
    # Explanations in a transaction of their own: it locks only PENDING jobs, which agents'
    # heartbeats never lock, so it cannot deadlock with them, and it keeps the apply short.
    async with sessionmaker() as session, session.begin():
        await check_fence(session, epoch, now=now, ttl_s=settings.lease_timeout_s)
        applied.pending_written = await write_pending(
            session, decisions, loaded, set(applied.started), everything=everything
        )
    return applied


async def run_cycle(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    epoch: int,
    settings: Settings,
    previously_open: frozenset[int] | None,
    explain_all: bool = True,
    settle_until: datetime | None = None,
    now: datetime | None = None,
    scheduler: Scheduler | None = None,
) -> CycleResult:
    """Run one cycle. Raises `LeaseLost` when the fence refuses the apply (nothing written).

    `scheduler`: the caller's, kept across its cycles (one cycle at a time); None: a fresh one.
    """
    began = time.perf_counter()
    now = now or utcnow()
    result = CycleResult(at=now, explained_all=explain_all)
    result.lifecycle = await run_maintenance(sessionmaker, epoch=epoch, settings=settings, now=now)
    config = settings.policy.to_policy_config()
    t0 = time.perf_counter()
    async with sessionmaker() as session, session.begin():
        if session.get_bind().dialect.name == "postgresql":
            # One consistent view for every query of the load (READ COMMITTED would mix).
            await session.connection(
                execution_options={
                    "isolation_level": "REPEATABLE READ",
                    "postgresql_readonly": True,
                }
            )
        loaded = await load_snapshot(
            session, now=now, config=config, previously_open=previously_open
        )
    t1 = time.perf_counter()
    decide = (scheduler or Scheduler()).schedule
    decisions = await asyncio.to_thread(decide, loaded.snapshot)
    t2 = time.perf_counter()
    try:
        applied = await _apply(
            sessionmaker, loaded, decisions, epoch, settings, now, explain_all, settle_until
        )
    except IntegrityError:
        # The batch lost a race the guard did not see: again, one savepoint per start.
        applied = await _apply(
            sessionmaker,
            loaded,
            decisions,
            epoch,
            settings,
            now,
            explain_all,
            settle_until,
            one_by_one=True,
        )
    t3 = time.perf_counter()
    result.load_s, result.decide_s, result.apply_s = t1 - t0, t2 - t1, t3 - t2
    result.duration_s = t3 - began
    result.loaded, result.decisions, result.applied = loaded, decisions, applied
    result.open_allocation_ids = loaded.open_allocation_ids | frozenset(applied.new_allocation_ids)
    return result
