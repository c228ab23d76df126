"""Who may attach to which task of a job, and the attach event (docs/INTERACTIVE.md).

A terminal reaches into a running task, so it is an act on the job: its owner, an org-admin of
its org or a platform admin; a member of the same org who is not the owner is refused (403),
anybody else does not see the job (404, as every job route). Every attach is an event (the
first `max_job_events_per_kind` one by one, later ones counted in one row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Job, Node, Task
from scheduler.db.types import utcnow
from scheduler.services.arrays import get_job_ref
from scheduler.services.errors import Conflict
from scheduler.services.jobactions import check_may_act
from scheduler.services.jobevents import record_job_event

ATTACH_EVENT = "job.attach"
SHELL_EVENT = "job.shell"


@dataclass(frozen=True, slots=True)
class AttachTarget:
    job_id: int
    org_id: int
    task_id: int
    node_id: int
    rank: int


async def attach_target(
    session: AsyncSession,
    job_ref: str,
    *,
    rank: int,
    user_id: int,
    scope_org_id: int | None,
    may_admin_org: Callable[[int], bool],
) -> AttachTarget:
    """The running task of rank `rank` of the job, if the caller may attach to it: only rank 0
    of an interactive job has a terminal."""
    job = await get_job_ref(session, job_ref, scope_org_id=scope_org_id)
    check_may_act(job, user_id=user_id, may_admin_org=may_admin_org(job.org_id))
    if job.state is not JobState.RUNNING:
        raise Conflict(f"job {job.id} is {job.state.value}: only a running job can be attached to")
    if not job.interactive:
        raise Conflict(f"job {job.id} has no terminal (it was not submitted with `run --pty`)")
    if rank != 0:
        raise Conflict(f"job {job.id}'s terminal is on rank 0; rank {rank} has none")
    return await task_target(
        session, job, rank, capability="pty", lacking="has no terminals (older than `run --pty`)"
    )


async def new_shell_target(
    session: AsyncSession,
    job_ref: str,
    *,
    rank: int,
    user_id: int,
    scope_org_id: int | None,
    may_admin_org: Callable[[int], bool],
) -> AttachTarget:
    """The running task of rank `rank` of the job, if the caller may open a new shell in its
    sandbox (`attach --new`): any rank of any running job, batch or interactive, as Slurm's
    `srun --overlap --jobid`; not a container task, whose sandbox is its runtime's."""
    job = await get_job_ref(session, job_ref, scope_org_id=scope_org_id)
    check_may_act(job, user_id=user_id, may_admin_org=may_admin_org(job.org_id))
    if job.state is not JobState.RUNNING:
        raise Conflict(f"job {job.id} is {job.state.value}: only a running job takes a new shell")
    if job.image:
        raise Conflict(
            f"job {job.id} runs in a container ({job.image}): `attach --new` opens shells "
            "only in tasks that run on the node itself"
        )
    return await task_target(
        session, job, rank, capability="new-shell", lacking="cannot open new shells"
    )


async def task_target(
    session: AsyncSession, job: Job, rank: int, *, capability: str, lacking: str
) -> AttachTarget:
    """The running task of rank `rank` of a running job, on a node whose agent has
    `capability` (`lacking` says what its agent cannot do, for the 409)."""
    if not 0 <= rank < job.num_nodes:  # before the query: a rank beyond the column is a 500
        raise Conflict(f"job {job.id} has no rank {rank} (it runs on {job.num_nodes} node(s))")
    task = await session.scalar(
        select(Task)
        .where(
            Task.job_id == job.id,
            Task.attempt == job.requeue_count,
            Task.node_rank == rank,
        )
        .limit(1)
    )
    if task is None:
        raise Conflict(f"job {job.id} has no rank {rank} (it runs on {job.num_nodes} node(s))")
    if task.state is not JobState.RUNNING or task.node_id is None:
        raise Conflict(f"rank {rank} of job {job.id} is not running yet; try again in a moment")
    capabilities = await session.scalar(select(Node.capabilities).where(Node.id == task.node_id))
    if capability not in (capabilities or ()):
        raise Conflict(f"job {job.id} runs on a node whose agent {lacking}")
    return AttachTarget(
        job_id=job.id, org_id=job.org_id, task_id=task.id, node_id=task.node_id, rank=rank
    )


async def record_stream_event(
    session: AsyncSession,
    target: AttachTarget,
    *,
    kind: str,
    actor: str,
    reason: str,
    details: dict[str, int],
    max_events: int,
) -> None:
    """The event `describe` shows for a stream opened into a job: who, when, what; past
    `max_events` of its kind on the job, counted in one row (scheduler/services/jobevents.py)."""
    await record_job_event(
        session,
        {
            "at": utcnow(),
            "kind": kind,
            "job_id": target.job_id,
            "node_id": target.node_id,
            "org_id": target.org_id,
            "actor": actor,
            "reason": reason,
            "details": details,
        },
        max_per_kind=max_events,
    )


async def record_terminal(
    session: AsyncSession, target: AttachTarget, *, new: bool, actor: str, max_events: int
) -> None:
    """Who attached to a terminal, or opened a new shell (`new`), when, on which rank."""
    reason = (
        f"opened a new shell in the sandbox of rank {target.rank}"
        if new
        else f"attached to the terminal of rank {target.rank}"
    )
    await record_stream_event(
        session,
        target,
        kind=SHELL_EVENT if new else ATTACH_EVENT,
        actor=actor,
        reason=reason,
        details={"rank": target.rank},
        max_events=max_events,
    )
