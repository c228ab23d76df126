"""Policy for interactive jobs (a terminal or a notebook on allocated GPUs): the longest time
limit an org's interactive jobs may ask for, and how long they may sit idle.

A shell holds its GPUs whether or not anybody types, so a platform admin bounds it per org
(`orgs.interactive_max_time_s`) and ends it when idle (`orgs.interactive_idle_timeout_s`: no
input and no GPU use for that long; the agent enforces it); an org that sets neither takes its
parent's, up to the server's. Everything else about an interactive job is a job's: fair share,
quotas and the org's other limits count it as any other.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from scheduler.db import Org
from scheduler.services.errors import InvalidInput
from scheduler.services.orgs import MAX_TREE_DEPTH, nearest_set


async def interactive_max_time_of(session: AsyncSession, org_id: int, default_s: int) -> int:
    """The org's own maximum, else its nearest ancestor's, else `default_s` (the server's)."""
    return await _inherited(session, org_id, Org.interactive_max_time_s, default_s)


async def interactive_idle_timeout_of(session: AsyncSession, org_id: int, default_s: int) -> int:
    """The org's own idle timeout (0: never), else its nearest ancestor's, else `default_s`."""
    return await _inherited(session, org_id, Org.interactive_idle_timeout_s, default_s)


async def _inherited(
    session: AsyncSession,
    org_id: int,
    column: InstrumentedAttribute[int | None],
    default_s: int,
) -> int:
    values: list[int | None] = []
    current: int | None = org_id
    while current is not None and len(values) <= MAX_TREE_DEPTH:
        row = (
            await session.execute(select(Org.parent_id, column).where(Org.id == current))
        ).one_or_none()
        if row is None:
            break
        current, own = row
        values.append(own)
    found = nearest_set(values)
    return found if found is not None else default_s


async def check_interactive_time(
    session: AsyncSession, *, org_id: int, time_limit_s: int, default_s: int
) -> None:
    """Refuse (422) an interactive job's time limit beyond its org's maximum."""
    max_s = await interactive_max_time_of(session, org_id, default_s)
    if time_limit_s > max_s:
        raise InvalidInput(
            f"an interactive job may run at most {max_s} s in this org, not {time_limit_s} s "
            "(a platform admin sets it: fairgpu org update ORG --interactive-max-time)",
            interactive_max_time_s=max_s,
        )
