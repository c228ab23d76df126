"""Usage reports from the ledger and the rollup of purged jobs: GPU-hours allocated and busy,
energy, by org, user or GPU type, per day, week (ISO, from Monday) or month, in UTC.

The database sums the hourly ledger rows per key and hour; the roll-up to days, weeks and
months happens here, so the same code serves PostgreSQL and SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Select, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Org, UsageRecord, UsageRollup, User
from scheduler.services.errors import InvalidInput

By = Literal["org", "user", "gpu_type"]
Period = Literal["day", "week", "month"]
MAX_REPORT_DAYS = 3 * 366
# Lines of one report (periods x keys): a day report by user of an org of 1,000 users over
# three years would be a million lines; beyond this the caller narrows it (422).
MAX_REPORT_LINES = 50_000
STREAM_ROWS = 5_000  # hourly sums fetched at a time


@dataclass(slots=True)
class UsageLine:
    period_start: datetime
    key: str
    gpu_hours_allocated: float = 0.0
    gpu_hours_busy: float = 0.0
    billed_gpu_hours: float = 0.0
    energy_joules: float = 0.0
    preempted_gpu_hours: float = 0.0


def period_start(at: datetime, period: Period) -> datetime:
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


async def usage_report(
    session: AsyncSession,
    *,
    by: By,
    period: Period,
    since: datetime,
    until: datetime,
    org_ids: set[int] | None,
    unnamed_org_ids: set[int] | None = None,
) -> list[UsageLine]:
    """Rows ordered by period, then key. `org_ids` limits the report (None: every org).
    By user, a line is `ORG/NAME` (names are unique per org only); the users of
    `unnamed_org_ids` (orgs beyond the caller's tenant wall) are not named: each such org's
    are summed in one line, `ORG/*` (`/` and `*` are in no user name).
    InvalidInput past MAX_REPORT_LINES lines; the rows it reads are the orgs' own ledger rows
    in the window, at most their GPUs held times its hours.

    The ledger holds the jobs still kept; the rollup, the purged ones' sums
    (scheduler/services/jobpurge.py): the report adds both, so a purge changes no total."""
    lines: dict[tuple[datetime, str], UsageLine] = {}
    for table in (UsageRecord, UsageRollup):
        stmt = _summed(
            table,
            by=by,
            since=since,
            until=until,
            org_ids=org_ids,
            unnamed_org_ids=unnamed_org_ids or set(),
        )
        async for row in await session.stream(stmt.execution_options(yield_per=STREAM_ROWS)):
            start = period_start(row.period_start, period)
            line = lines.get((start, row.key))
            if line is None:
                if len(lines) >= MAX_REPORT_LINES:
                    raise InvalidInput(
                        f"the report has more than {MAX_REPORT_LINES} lines: ask for a shorter "
                        "period (since, until), a coarser one (week, month) or one org"
                    )
                line = lines[start, row.key] = UsageLine(start, row.key)
            alloc_h = float(row.alloc or 0.0) / 3600.0
            line.gpu_hours_allocated += alloc_h
            line.gpu_hours_busy += float(row.busy or 0.0) / 3600.0
            line.billed_gpu_hours += float(row.billed or 0.0) / 3600.0
            line.energy_joules += float(row.energy or 0.0)
            if row.preempted:
                line.preempted_gpu_hours += alloc_h
    return [lines[k] for k in sorted(lines)]


def _summed(
    table: type[UsageRecord] | type[UsageRollup],
    *,
    by: By,
    since: datetime,
    until: datetime,
    org_ids: set[int] | None,
    unnamed_org_ids: set[int],
) -> Select[str, datetime, bool, float, float, float, float]:
    """One table's sums per key, hour and preempted (both tables have the same columns)."""
    # By user, `ORG/NAME`: a name is unique within its org only, and two orgs' users of one
    # name are two lines.
    user_key = Org.name.concat("/").concat(User.name)
    key_col: Any = {"org": Org.name, "user": user_key, "gpu_type": table.gpu_type}[by]
    if by == "user" and unnamed_org_ids:
        key_col = case(
            (table.org_id.in_(sorted(unnamed_org_ids)), Org.name.concat("/*")),
            else_=user_key,
        )
    stmt = (
        select(
            key_col.label("key"),
            table.period_start,
            table.preempted,
            func.sum(table.gpu_seconds_allocated).label("alloc"),
            func.sum(table.gpu_seconds_busy).label("busy"),
            func.sum(table.billed_gpu_seconds).label("billed"),
            func.sum(table.energy_joules).label("energy"),
        )
        .where(table.period_start >= since, table.period_start < until)
        .group_by(key_col, table.period_start, table.preempted)
    )
    if by == "org":
        stmt = stmt.join(Org, Org.id == table.org_id)
    elif by == "user":
        stmt = stmt.join(User, User.id == table.user_id).join(Org, Org.id == table.org_id)
    if org_ids is not None:
        stmt = stmt.where(table.org_id.in_(sorted(org_ids)))
    return stmt
