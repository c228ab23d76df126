"""Changing a pending job (`fairgpu update`, Slurm's `scontrol update job`): its time limit,
name and hold. Members may only lower a time limit (a longer one would take a place in the
backfill plan it was not given); org and platform admins may raise it up to the maximum.
An array's id changes every pending task of the array alike.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Job
from scheduler.db.types import utcnow
from scheduler.services import holds, jobsubmit
from scheduler.services.errors import Conflict, Forbidden, InvalidInput
from scheduler.services.interactivelimits import check_interactive_time
from scheduler.services.jobevents import record_job_events

_JOBS: Table = Job.__table__  # type: ignore[assignment]


async def update_job(
    session: AsyncSession,
    job: Job,
    *,
    whole_array: bool,
    time_limit_s: int | None,
    name: str | None,
    hold: bool | None,
    may_admin: bool,
    max_time_limit_s: int,
    interactive_max_time_s: int,
    actor: str,
    max_events: int,
    now: datetime | None = None,
) -> None:
    """Apply the changes given (None: unchanged) to a pending job, or to every pending task of
    its array when `whole_array` (`may_admin`: the caller administers the job's org); 409 when
    there is none, 403 for a member raising the time or releasing an admin hold,
    422 beyond the maximum (for an interactive job, its org's interactive maximum). Each
    changed job gets a `job.update` event, up to `max_events` per job, then counted."""
    if job.state is not JobState.PENDING and not whole_array:
        raise Conflict(f"only pending jobs can be updated; job {job.id} is {job.state}")
    changes: dict[str, Any] = {}
    if time_limit_s is not None:
        if time_limit_s > max_time_limit_s:
            raise InvalidInput(
                f"time limit {time_limit_s} s exceeds the maximum of {max_time_limit_s} s",
                max_time_limit_s=max_time_limit_s,
            )
        if time_limit_s > job.time_limit_s and not may_admin:
            raise Forbidden(
                f"members may only lower a pending job's time limit ({job.time_limit_s} s); "
                "an org admin may raise it"
            )
        if job.interactive:  # the org's bound holds for a raised limit too
            await check_interactive_time(
                session,
                org_id=job.org_id,
                time_limit_s=time_limit_s,
                default_s=interactive_max_time_s,
            )
        # The warning signal still has to come after the start (every task of an array has one).
        jobsubmit.check_signal_lead(job.signal, time_limit_s, math.inf)
        changes["time_limit_s"] = time_limit_s
    if name is not None:
        changes["name"] = name
    if changes:
        which = (
            _JOBS.c.array_job_id == job.array_job_id if whole_array else _JOBS.c.id == job.id,
            _JOBS.c.state == JobState.PENDING,
        )
        changed = await session.execute(update(_JOBS).where(*which).values(**changes))
        if not changed.rowcount:  # type: ignore[attr-defined]
            raise Conflict(f"job {job.id} has no pending job or task to update")
        elements = (await session.execute(select(_JOBS.c.id, _JOBS.c.org_id).where(*which))).all()
        fields = {"at": now or utcnow(), "kind": "job.update", "actor": actor, "details": changes}
        await record_job_events(
            session,
            [{"job_id": job_id, "org_id": org_id, **fields} for job_id, org_id in elements],
            max_per_kind=max_events,
        )
    if hold is not None:
        await holds.change_hold(
            session,
            job,
            hold=hold,
            whole_array=whole_array,
            actor=actor,
            may_admin=may_admin,
            max_events=max_events,
        )
    await session.flush()
    await session.refresh(job)
