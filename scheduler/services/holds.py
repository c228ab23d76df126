"""Holds, as Slurm's: a user hold its owner may release, an admin hold only an admin may.

`fairgpu hold` by the job's owner is a user hold (Slurm's `scontrol uhold`, reason
`JobHeldUser`); by an org admin of the job's org or a platform admin it is an admin hold
(`scontrol hold` by an operator, `JobHeldAdmin`), unless they ask for a user hold. A member
releasing an admin hold gets 403 with who held it and why; an admin releases either. An admin
hold replaces a user hold; a user hold leaves an admin hold as it is. Every change is an event
(`job.hold` with the level and reason, `job.release`), and the hold's holder and reason are on
the job for `describe` and `explain`. A job held at submission (`--hold`) has a user hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Table, and_, func, not_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Job
from scheduler.db.types import utcnow
from scheduler.services.errors import Conflict, Forbidden
from scheduler.services.jobevents import record_job_events

HoldLevel = Literal["user", "admin"]
USER: HoldLevel = "user"
ADMIN: HoldLevel = "admin"
HELD_USER = "JobHeldUser"
HELD_ADMIN = "JobHeldAdmin"

_JOBS: Table = Job.__table__  # type: ignore[assignment]


def level_of(job: Job) -> HoldLevel | None:
    """The job's hold, None when it is not held."""
    if not job.held:
        return None
    return ADMIN if job.hold_level == ADMIN else USER


def hold_reason(job: Job) -> dict[str, Any] | None:
    """A held job's first reason (explain, the queue): the hold as it is now, not as the last
    cycle saw it."""
    level = level_of(job)
    if level is None:
        return None
    by = f" by {job.held_by}" if job.held_by else ""
    why = f": {job.hold_reason}" if job.hold_reason else ""
    if level == ADMIN:
        message = f"held by an admin{by}{why}; only an org or platform admin may release it"
        code = HELD_ADMIN
    else:
        message = f"held by a user{by}{why}"
        code = HELD_USER
    details = {"level": level, "held_by": job.held_by, "reason": job.hold_reason}
    return {"code": code, "message": message, "details": details}


def _level_asked(level: HoldLevel | None, *, may_admin: bool) -> HoldLevel:
    if level == ADMIN and not may_admin:
        raise Forbidden(
            "only an org admin of the job's org or a platform admin places an admin hold"
        )
    return level or (ADMIN if may_admin else USER)


def _admin_held() -> Any:
    return and_(_JOBS.c.held.is_(True), _JOBS.c.hold_level == ADMIN)


async def change_hold(
    session: AsyncSession,
    job: Job,
    *,
    hold: bool,
    whole_array: bool,
    actor: str,
    may_admin: bool,
    level: HoldLevel | None = None,
    reason: str | None = None,
    now: datetime | None = None,
    max_events: int,
) -> None:
    """Hold (at `level`, by default the caller's) or release the pending job, or every pending
    element of its array when `whole_array`. 409 when nothing is pending, 403 for a member
    asking for an admin hold or releasing one. Each changed job gets its event, up to
    `max_events` holds (and releases) per job, then counted (scheduler/services/jobevents.py)."""
    which = (
        _JOBS.c.array_job_id == job.array_job_id if whole_array else _JOBS.c.id == job.id,
        _JOBS.c.state == JobState.PENDING,
    )
    pending = await session.scalar(select(func.count()).where(*which))
    if not pending:
        verb = "held" if hold else "released"
        what = f"array {job.id} has none" if whole_array else f"job {job.id} is {job.state}"
        raise Conflict(f"only pending jobs can be {verb}; {what}", state=str(job.state))
    if hold:
        asked = _level_asked(level, may_admin=may_admin)
        # A new hold, or an admin hold over a user one; a user hold leaves an admin hold be.
        changing = not_(_JOBS.c.held) if asked == USER else or_(not_(_JOBS.c.held), not_(
            _admin_held()))  # fmt: skip
        values: dict[str, Any] = {
            "held": True,
            "hold_level": asked,
            "held_by": actor,
            "hold_reason": reason,
        }
        event: dict[str, str | None] = {
            "kind": "job.hold",
            "reason": f"{asked} hold" + (f": {reason}" if reason else ""),
        }
        details: dict[str, Any] = {"level": asked}
    else:
        if not may_admin:
            admin_held = (
                await session.execute(
                    select(_JOBS.c.id, _JOBS.c.held_by, _JOBS.c.hold_reason)
                    .where(*which, _admin_held())
                    .limit(1)
                )
            ).first()
            if admin_held is not None:
                by = f" by {admin_held.held_by}" if admin_held.held_by else ""
                why = f" ({admin_held.hold_reason})" if admin_held.hold_reason else ""
                raise Forbidden(
                    f"job {admin_held.id} is held by an admin{by}{why}; only an org admin or a "
                    "platform admin may release it"
                )
        changing = _JOBS.c.held.is_(True)
        values = {"held": False, "hold_level": None, "held_by": None, "hold_reason": None}
        event = {"kind": "job.release", "reason": None}
        details = {}
    changed: Sequence[Any] = (
        await session.execute(
            update(_JOBS)
            .where(*which, changing)
            .values(**values)
            .returning(_JOBS.c.id, _JOBS.c.org_id)
        )
    ).all()
    if changed:
        at = now or utcnow()
        await record_job_events(
            session,
            [
                {"at": at, "job_id": job_id, "org_id": org_id, "actor": actor,
                 "details": details, **event}
                for job_id, org_id in changed
            ],
            max_per_kind=max_events,
        )  # fmt: skip
    await session.flush()
    await session.refresh(job)
