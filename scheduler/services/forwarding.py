"""Who may forward a port of which task of a job, and the forward event (docs/INTERACTIVE.md).

The same people as for a terminal (scheduler/services/interactive.py): the job's owner, an
org-admin of its org or a platform admin; a member who is not the owner gets 403, anybody else
404. Any running task of any running job may be forwarded to, on a node whose agent can.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.services.arrays import get_job_ref
from scheduler.services.errors import Conflict
from scheduler.services.interactive import AttachTarget, record_stream_event, task_target
from scheduler.services.jobs import check_may_act

FORWARD_EVENT = "job.forward"


async def forward_target(
    session: AsyncSession,
    job_ref: str,
    *,
    rank: int,
    user_id: int,
    scope_org_id: int | None,
    may_admin_org: Callable[[int], bool],
) -> AttachTarget:
    """The running task of rank `rank` of the job, if the caller may forward to it."""
    job = await get_job_ref(session, job_ref, scope_org_id=scope_org_id)
    check_may_act(job, user_id=user_id, may_admin_org=may_admin_org(job.org_id))
    if job.state is not JobState.RUNNING:
        raise Conflict(f"job {job.id} is {job.state.value}: only a running job's ports forward")
    return await task_target(
        session,
        job,
        rank,
        capability="port-forward",
        lacking="cannot forward ports (older than `port-forward`)",
    )


async def record_forward(
    session: AsyncSession, target: AttachTarget, *, actor: str, port: int, max_events: int
) -> None:
    """Who forwarded a connection, when, to which port and rank."""
    await record_stream_event(
        session,
        target,
        kind=FORWARD_EVENT,
        actor=actor,
        reason=f"forwarded a connection to port {port} of rank {target.rank}",
        details={"rank": target.rank, "port": port},
        max_events=max_events,
    )
