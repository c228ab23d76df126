"""What every job route shares: the job reference, the caller's scope and a job's public form."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import Principal, SessionDep
from api.schemas.jobs import JobPublic, JobReason
from scheduler.db import Job
from scheduler.secretenv import masked
from scheduler.services import holds
from scheduler.services.joblist import ListedJob, first_reason, get_listed
from scheduler.services.redact import hidden_from, redact_text

JobRef = Annotated[
    str,
    Path(
        pattern=r"^[0-9]{1,19}(_[0-9]{1,7})?$",
        description="A job id (`42`), or an array element: the array's id and the task id "
        "(`42_7`). Actions on an array's id apply to all its elements.",
    ),
]


def scope_of(principal: Principal) -> int | None:
    """The org a caller's view is limited to; None for platform admins. -1 sees nothing."""
    if principal.is_platform_admin:
        return None
    return principal.org_id if principal.org_id is not None else -1


def job_public(job: Job, depends_on: list[int] | None = None) -> JobPublic:
    return JobPublic(
        id=job.id,
        org_id=job.org_id,
        user_id=job.user_id,
        name=job.name,
        command=job.command,
        image=job.image,
        env=job.env,
        secret_env=masked(job.secret_env_ciphertext),
        workdir=job.workdir,
        gpus_per_node=job.gpus_per_node,
        nodes=job.num_nodes,
        memory_bytes=job.memory_bytes,
        gpu_type=job.gpu_type,
        site=job.site,
        time_limit_s=job.time_limit_s,
        priority_class=job.priority_class,
        preemptible=job.preemptible,
        requeue=job.requeue if job.requeue is not None else job.preemptible,
        signal=job.signal,
        held=job.held,
        hold_level=holds.level_of(job),
        held_by=job.held_by if job.held else None,
        hold_reason=job.hold_reason if job.held else None,
        interactive=job.interactive,
        network=job.network,
        state=job.state,
        state_reason=job.state_reason,
        exit_code=job.exit_code,
        requeue_count=job.requeue_count,
        submitted_at=job.submitted_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        estimated_start_at=job.estimated_start_at,
        depends_on=depends_on or [],
        array_job_id=job.array_job_id,
        array_task_id=job.array_task_id,
        array_limit=job.array_limit,
    )


def listed_public(listed: ListedJob, hidden: set[int]) -> JobPublic:
    public = job_public(listed.job, listed.depends_on)
    public.org_name = listed.org_name
    public.user_name = listed.user_name
    public.node_names = listed.node_names
    reason = first_reason(listed.job)
    if reason:
        public.pending_reason = JobReason(code=reason[0], message=redact_text(reason[1], hidden))
    return public


async def hidden_for(session: AsyncSession, principal: Principal, jobs: list[Job]) -> set[int]:
    """Jobs of other orgs that these jobs' reasons name: shown to members without their ids."""
    if principal.is_platform_admin:
        return set()
    reasons = [r for job in jobs for r in job.pending_reasons or []]
    return await hidden_from(session, reasons, principal.org_id)


async def read_public(session: SessionDep, job: Job, principal: Principal) -> JobPublic:
    hidden = await hidden_for(session, principal, [job])
    return listed_public(await get_listed(session, job), hidden)


def notify(request: Request, reason: str, nodes: list[int] | None = None) -> None:
    runtime = request.app.state.runtime
    if nodes:
        runtime.wake_nodes(nodes)
    runtime.notify(reason)
