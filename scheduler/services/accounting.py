"""The usage ledger (per allocation per hour) and the decayed usage the fair share runs on.

Allocated GPU-seconds are written when an allocation closes, as one row per hour bucket it
overlaps; the write sets (never adds) each bucket's allocated seconds, so settling again is
harmless and the ledger always equals the allocation's interval. Busy GPU-seconds and energy
come from the agent's samples and are added to the bucket each sample falls in.

Decayed usage (`OrgUsage`) is folded forward by the scheduling cycle from the allocations that
were open at the previous fold or opened since, so a cycle never scans the usage history.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Table, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.core import decay_factor, interval_usage
from scheduler.db import Allocation, OrgUsage, UsageRecord

BUCKET_S = 3600.0
_LEDGER: Table = UsageRecord.__table__  # type: ignore[assignment]
_ORG_USAGE: Table = OrgUsage.__table__  # type: ignore[assignment]


def _insert(session: AsyncSession, table: Table) -> Any:
    """INSERT … ON CONFLICT for whichever database the session talks to."""
    if session.get_bind().dialect.name == "postgresql":
        return pg_insert(table)
    return sqlite_insert(table)


def bucket_start(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_buckets(start: datetime, end: datetime) -> list[tuple[datetime, float]]:
    """(bucket start, seconds of [start, end) inside it) for every hour the interval touches."""
    out: list[tuple[datetime, float]] = []
    cursor = start
    while cursor < end:
        bucket = bucket_start(cursor)
        bucket_end = min(end, bucket + timedelta(seconds=BUCKET_S))
        out.append((bucket, (bucket_end - cursor).total_seconds()))
        cursor = bucket_end
    if not out:  # a zero-length allocation still leaves a row, so it is visible
        out.append((bucket_start(start), 0.0))
    return out


async def settle_allocations(
    session: AsyncSession,
    allocations: Sequence[Allocation],
    *,
    preempted: bool,
    gpu_weights: Mapping[str, float],
    since: datetime | None = None,
    until: datetime | None = None,
) -> None:
    """Write the allocated (and billed) GPU-seconds of allocations to the ledger.

    Closed allocations are settled whole. Open ones are settled from `since` to `until` (both
    on hour boundaries), so that a job running for weeks shows in hourly reports before it ends;
    the settle at close rewrites every bucket with the same values plus the last, partial one.
    """
    rows: list[dict[str, Any]] = []
    for alloc in allocations:
        end = alloc.ended_at or until
        if end is None:
            continue
        start = alloc.started_at if since is None else max(alloc.started_at, since)
        if alloc.ended_at is None and start >= end:
            continue
        weight = gpu_weights.get(alloc.gpu_type, 1.0)
        for bucket, seconds in hour_buckets(start, end):
            rows.append(
                {
                    "allocation_id": alloc.id,
                    "org_id": alloc.org_id,
                    "user_id": alloc.user_id,
                    "job_id": alloc.job_id,
                    "gpu_type": alloc.gpu_type,
                    "period_start": bucket,
                    "gpu_seconds_allocated": seconds,
                    "gpu_seconds_busy": 0.0,
                    "billed_gpu_seconds": seconds * weight,
                    "energy_joules": 0.0,
                    "preempted": preempted,
                }
            )
    if not rows:
        return
    stmt = _insert(session, _LEDGER).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["allocation_id", "period_start"],
        set_={
            "gpu_seconds_allocated": stmt.excluded.gpu_seconds_allocated,
            "billed_gpu_seconds": stmt.excluded.billed_gpu_seconds,
            "preempted": stmt.excluded.preempted,
        },
    )
    await session.execute(stmt)


class HeldGpu(Protocol):
    """What sample accounting reads of an allocation: an ORM row or a plain record."""

    @property
    def id(self) -> int: ...
    @property
    def org_id(self) -> int: ...
    @property
    def user_id(self) -> int: ...
    @property
    def job_id(self) -> int: ...
    @property
    def gpu_type(self) -> str: ...
    @property
    def started_at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class SampleUsage:
    """Busy seconds and energy one GPU sample adds to the allocation holding that GPU."""

    allocation: HeldGpu
    at: datetime
    busy_s: float
    energy_joules: float


def sample_usage(
    allocation: HeldGpu,
    *,
    previous_at: datetime | None,
    previous_energy_joules: float | None,
    at: datetime,
    utilization_ratio: float | None,
    energy_joules: float | None,
    max_gap_s: float,
) -> SampleUsage | None:
    """What happened on the GPU between two samples, counted only while it was allocated.

    The utilisation of a sample stands for the interval since the previous one, capped at
    `max_gap_s` so that an agent that was away does not claim the whole gap as busy. Energy is
    the difference of the monotonic counter, prorated to the allocated part of the interval;
    a counter that went backwards (driver reload) counts nothing.
    """
    if previous_at is None or at <= previous_at:
        return None
    start = max(previous_at, allocation.started_at, at - timedelta(seconds=max_gap_s))
    if at <= start:
        return None
    seconds = (at - start).total_seconds()
    busy_s = seconds * utilization_ratio if utilization_ratio is not None else 0.0
    energy = 0.0
    if energy_joules is not None and previous_energy_joules is not None:
        delta = energy_joules - previous_energy_joules
        if delta > 0:
            energy = delta * seconds / (at - previous_at).total_seconds()
    if busy_s <= 0 and energy <= 0:
        return None
    return SampleUsage(allocation=allocation, at=at, busy_s=busy_s, energy_joules=energy)


# PostgreSQL: thousands of ledger rows as one statement of eight array parameters. Per-row
# parameters cost more CPU in the server than the database spends on the upsert.
_LEDGER_UPSERT_PG = text(
    "INSERT INTO usage_ledger (allocation_id, org_id, user_id, job_id, gpu_type, period_start,"
    " gpu_seconds_allocated, gpu_seconds_busy, billed_gpu_seconds, energy_joules, preempted)"
    " SELECT v.a, v.o, v.u, v.j, v.g, v.p, 0, v.b, 0, v.e, false FROM unnest("
    "CAST(:allocation_id AS BIGINT[]), CAST(:org_id AS INTEGER[]), CAST(:user_id AS INTEGER[]),"
    " CAST(:job_id AS BIGINT[]), CAST(:gpu_type AS VARCHAR[]),"
    " CAST(:period_start AS TIMESTAMPTZ[]), CAST(:gpu_seconds_busy AS FLOAT8[]),"
    " CAST(:energy_joules AS FLOAT8[])) AS v(a, o, u, j, g, p, b, e)"
    " ON CONFLICT (allocation_id, period_start) DO UPDATE SET"
    " gpu_seconds_busy = usage_ledger.gpu_seconds_busy + excluded.gpu_seconds_busy,"
    " energy_joules = usage_ledger.energy_joules + excluded.energy_joules"
)


async def record_sample_usage(session: AsyncSession, usages: Iterable[SampleUsage]) -> None:
    """Add busy seconds and energy to the ledger: one upsert per few thousand rows."""
    # (allocation, hour) → [allocation, busy seconds, joules]: usages of one bucket add up.
    sums: dict[tuple[int, datetime], list[Any]] = {}
    for u in usages:
        key = (u.allocation.id, bucket_start(u.at))
        entry = sums.get(key)
        if entry is None:
            sums[key] = [u.allocation, u.busy_s, u.energy_joules]
        else:
            entry[1] += u.busy_s
            entry[2] += u.energy_joules
    if not sums:
        return
    if session.get_bind().dialect.name == "postgresql":
        allocs = [entry[0] for entry in sums.values()]
        await session.execute(
            _LEDGER_UPSERT_PG,
            {
                "allocation_id": [a.id for a in allocs],
                "org_id": [a.org_id for a in allocs],
                "user_id": [a.user_id for a in allocs],
                "job_id": [a.job_id for a in allocs],
                "gpu_type": [a.gpu_type for a in allocs],
                "period_start": [period for _, period in sums],
                "gpu_seconds_busy": [entry[1] for entry in sums.values()],
                "energy_joules": [entry[2] for entry in sums.values()],
            },
        )
        return
    merged = [
        {
            "allocation_id": a.id,
            "org_id": a.org_id,
            "user_id": a.user_id,
            "job_id": a.job_id,
            "gpu_type": a.gpu_type,
            "period_start": period,
            "gpu_seconds_allocated": 0.0,
            "gpu_seconds_busy": busy,
            "billed_gpu_seconds": 0.0,
            "energy_joules": joules,
            "preempted": False,
        }
        for (_, period), (a, busy, joules) in sums.items()
    ]
    # Parameters as an executemany: SQLAlchemy batches the rows into multi-row statements
    # within the driver's limit on parameters (asyncpg: 32,767, about 3,000 ledger rows).
    stmt = _insert(session, _LEDGER)
    stmt = stmt.on_conflict_do_update(
        index_elements=["allocation_id", "period_start"],
        set_={
            "gpu_seconds_busy": _LEDGER.c.gpu_seconds_busy + stmt.excluded.gpu_seconds_busy,
            "energy_joules": _LEDGER.c.energy_joules + stmt.excluded.energy_joules,
        },
    )
    await session.execute(stmt, merged)


@dataclass(frozen=True, slots=True)
class HeldInterval:
    """An allocation's span for the decayed-usage fold: `end` None while it is still open."""

    allocation_id: int
    org_id: int
    gpu_type: str
    start: float
    end: float | None


def fold_usage(
    previous: Mapping[int, tuple[float, float]],
    intervals: Iterable[HeldInterval],
    now: float,
    *,
    half_life_s: float,
    gpu_weights: Mapping[str, float],
) -> dict[int, float]:
    """Org id → decayed usage at `now`, from each org's (value, as_of) and the intervals.

    Only the part of an interval after the org's `as_of` counts, so an open allocation may be
    passed at every fold without being counted twice.
    """
    out = {
        org_id: value * decay_factor(now - as_of, half_life_s)
        for org_id, (value, as_of) in previous.items()
    }
    for iv in intervals:
        as_of = previous.get(iv.org_id, (0.0, float("-inf")))[1]
        start = max(iv.start, as_of)
        end = min(now if iv.end is None else iv.end, now)
        weight = gpu_weights.get(iv.gpu_type, 1.0)
        add = interval_usage(1, weight, start, end, now, half_life_s)
        if add > 0:
            out[iv.org_id] = out.get(iv.org_id, 0.0) + add
    return out


async def write_org_usage(session: AsyncSession, usage: Mapping[int, float], at: datetime) -> None:
    """Store the folded usage of every org, as of `at` (one statement)."""
    if not usage:
        return
    rows = [
        {"org_id": org_id, "decayed_gpu_seconds": value, "as_of": at}
        for org_id, value in sorted(usage.items())
    ]
    stmt = _insert(session, _ORG_USAGE).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["org_id"],
        set_={
            "decayed_gpu_seconds": stmt.excluded.decayed_gpu_seconds,
            "as_of": stmt.excluded.as_of,
        },
    )
    await session.execute(stmt)
