"""Job arrays: one submission, many elements (`--array 0-99%8`), each a job of its own.

Every element is an ordinary job that the scheduler treats like any other of its org; they
share `array_job_id`, the id of the first element, which names the array (`42`, and `42_7` for
the element with task id 7). `array_limit` (`%8`) caps how many elements are active at once:
the cycle's load gives the core only as many candidates as the limit leaves room for, and the
others wait with the reason `JobArrayTaskLimit`.

A submission inserts all elements with a few multi-row statements in one transaction: 10,000
elements take about a second, where 10,000 submissions would take minutes.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy import Table, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Event, Job, JobDependency, User
from scheduler.db.types import utcnow
from scheduler.secretenv import HOW_TO_CONFIGURE, seal
from scheduler.services import jobactions, jobqueries, jobsubmit
from scheduler.services.dependencies import AFTEROK
from scheduler.services.errors import Conflict, InvalidInput, NotFound, SecretsNotConfigured
from scheduler.services.interactivelimits import check_interactive_time
from scheduler.services.rowlocks import lock_owner_row
from scheduler.services.tenantlimits import (
    SubmitLimits,
    check_submission,
    lock_pending_counts,
)

MAX_ARRAY_TASKS = 10_000
# Each task is a job row with its own copy of the command, environment and script: one request
# may not make the server write (and hold, while it does) more than this.
MAX_ARRAY_BYTES = 32 * 1024 * 1024
MAX_ARRAY_TASK_ID = 9_999_999
_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")
_JOBS: Table = Job.__table__  # type: ignore[assignment]
_EVENTS: Table = Event.__table__  # type: ignore[assignment]
_DEPS: Table = JobDependency.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class ArraySpec:
    task_ids: tuple[int, ...]  # ascending, distinct
    limit: int | None = None


def parse_array(text: str) -> ArraySpec:
    """Slurm's `--array`: `0-99`, `1,3,5-11:2`, with `%N` for at most N active at once.
    Raises ValueError with the reason."""
    spec, percent, limit_text = text.strip().partition("%")
    limit: int | None = None
    if percent:
        if not limit_text.isdigit() or int(limit_text) < 1:
            raise ValueError(f"bad array limit %{limit_text}: use %N with N >= 1")
        limit = int(limit_text)
    ids: set[int] = set()
    for item in spec.split(","):
        m = _ITEM.match(item.strip())
        if m is None:
            raise ValueError(f"bad array item {item.strip()!r}: use N, A-B or A-B:STEP")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        step = int(m.group(3)) if m.group(3) is not None else 1
        if last < first or step < 1 or last > MAX_ARRAY_TASK_ID:
            raise ValueError(
                f"bad array range {item.strip()!r}: A <= B <= {MAX_ARRAY_TASK_ID}, STEP >= 1"
            )
        if (last - first) // step + 1 + len(ids) > MAX_ARRAY_TASKS:
            raise ValueError(f"an array has at most {MAX_ARRAY_TASKS} elements")
        ids.update(range(first, last + 1, step))
    if len(ids) > MAX_ARRAY_TASKS:
        raise ValueError(f"an array has at most {MAX_ARRAY_TASKS} elements")
    return ArraySpec(tuple(sorted(ids)), limit)


def task_payload_bytes(spec: jobsubmit.JobSpec) -> int:
    """What every task of an array stores of its own: command, environment, secrets, script."""
    pairs = {**spec.env, **spec.secret_env}
    return (
        sum(len(arg.encode()) for arg in spec.command)
        + sum(len(k.encode()) + len(v.encode()) for k, v in pairs.items())
        + len((spec.script or "").encode())
        + len((spec.workdir or "").encode())
        + len((spec.image or "").encode())
    )


def check_array_bytes(spec: jobsubmit.JobSpec, tasks: int) -> None:
    """Refuse an array whose tasks together would store more than MAX_ARRAY_BYTES."""
    per_task = task_payload_bytes(spec)
    if per_task * tasks > MAX_ARRAY_BYTES:
        fits = max(1, MAX_ARRAY_BYTES // max(per_task, 1))
        raise InvalidInput(
            f"an array of {tasks} tasks would store {per_task * tasks / 2**20:.1f} MiB of "
            f"command, environment and script (each task keeps its own copy of {per_task} "
            f"bytes); at most {MAX_ARRAY_BYTES // 2**20} MiB: submit at most {fits} tasks at "
            "once, or keep the script in a file the job reads and run it by path",
            max_array_bytes=MAX_ARRAY_BYTES,
            task_bytes=per_task,
        )


async def submit_array(
    session: AsyncSession,
    *,
    org_id: int,
    user_id: int,
    actor: str,
    spec: jobsubmit.JobSpec,
    array: ArraySpec,
    idempotency_key: str | None = None,
    default_time_limit_s: int,
    max_time_limit_s: int,
    max_preemption_grace_s: float = jobactions.DEFAULT_MAX_GRACE_S,
    secret_cipher: MultiFernet | None = None,
    limits: SubmitLimits | None = None,
    now: datetime | None = None,
) -> jobsubmit.Submitted:
    """Store every element PENDING, with its event and dependencies; the first element's job
    (whose id names the array) is returned. The idempotency key goes on the first element: a
    retry returns it and stores nothing. Needs a transaction (the caller commits)."""
    if spec.secret_env and secret_cipher is None:
        raise SecretsNotConfigured(
            f"this server stores no secrets: it has no key to encrypt them ({HOW_TO_CONFIGURE})"
        )
    if idempotency_key is not None:
        existing = await jobqueries.find_by_idempotency_key(session, user_id, idempotency_key)
        if existing is not None:
            return jobsubmit.Submitted(existing, created=False)
    check_array_bytes(spec, len(array.task_ids))
    org = await jobsubmit.get_org(session, org_id)
    await lock_owner_row(session, User, user_id)  # the user's arrays count in turn
    await lock_pending_counts(session, user_id=user_id, org_id=org_id)  # and every submission
    await check_submission(
        session,
        org=org,
        user_id=user_id,
        priority_class=spec.priority_class,
        limits=limits or SubmitLimits(),
        adding=len(array.task_ids),
    )
    now = now or utcnow()
    time_limit_s = jobsubmit.time_limit_of(
        org, spec.time_limit, default_time_limit_s, max_time_limit_s
    )
    jobsubmit.check_signal_lead(spec.signal, time_limit_s, max_preemption_grace_s)
    if spec.interactive:
        await check_interactive_time(
            session,
            org_id=org_id,
            time_limit_s=time_limit_s,
            default_s=(limits or SubmitLimits()).interactive_max_time_s,
        )
    await jobsubmit.check_dependencies(session, org_id, spec.depends_on, spec.dependency_kinds)
    if spec.image is not None:
        await jobsubmit.check_image_allowed(session, org_id, spec.image)
    sealed = seal(secret_cipher, spec.secret_env) if secret_cipher and spec.secret_env else None
    values, event = jobsubmit.submission_rows(
        org_id=org_id,
        user_id=user_id,
        actor=actor,
        spec=spec,
        idempotency_key=None,
        time_limit_s=time_limit_s,
        now=now,
        secret_env_ciphertext=sealed,
    )
    values["array_limit"] = array.limit
    first_task, *other_tasks = array.task_ids
    first = {**values, "array_task_id": first_task, "idempotency_key": idempotency_key}
    first_id: int = await session.scalar(insert(_JOBS).values(**first).returning(_JOBS.c.id))
    await session.execute(update(_JOBS).where(_JOBS.c.id == first_id).values(array_job_id=first_id))
    if other_tasks:  # executemany without RETURNING: the drivers' fast path
        await session.execute(
            insert(_JOBS),
            [
                {
                    **values,
                    "array_job_id": first_id,
                    "array_task_id": task_id,
                    "job_secret": secrets.token_urlsafe(32),
                }
                for task_id in other_tasks
            ],
        )
    # Each task's PENDING event and dependencies come from the tasks' rows themselves.
    elements = select(_JOBS.c.id).where(_JOBS.c.array_job_id == first_id)
    await session.execute(
        insert(_EVENTS).from_select(
            ["job_id", *event],
            elements.add_columns(*(literal(v, _EVENTS.c[k].type) for k, v in event.items())),
        )
    )
    for depends_on_id in spec.depends_on:
        kind = spec.dependency_kinds.get(depends_on_id, AFTEROK)
        await session.execute(
            insert(_DEPS).from_select(
                ["job_id", "depends_on_id", "kind"],
                elements.add_columns(
                    literal(depends_on_id, _DEPS.c.depends_on_id.type),
                    literal(kind, _DEPS.c.kind.type),
                ),
            )
        )
    job = await session.get(Job, first_id)
    assert job is not None
    return jobsubmit.Submitted(job, created=True)


def array_env(job: Job, stats: tuple[int, int, int] | None) -> dict[str, str]:
    """An element's FAIRGPU_ARRAY_* variables and Slurm's SLURM_ARRAY_* aliases; `stats` is
    (count, min, max) of its array's task ids."""
    if job.array_job_id is None or stats is None:
        return {}
    count, low, high = stats
    values: dict[str, Any] = {
        "JOB_ID": job.array_job_id,
        "TASK_ID": job.array_task_id,
        "TASK_COUNT": count,
        "TASK_MIN": low,
        "TASK_MAX": high,
    }
    env: dict[str, str] = {}
    for name, value in values.items():
        env[f"FAIRGPU_ARRAY_{name}"] = env[f"SLURM_ARRAY_{name}"] = str(value)
    return env


async def get_job_ref(session: AsyncSession, ref: str, *, scope_org_id: int | None) -> Job:
    """The job `ref` names: `42` (a job, or an array's first element) or `42_7` (the element
    of array 42 with task id 7). NotFound as for `get_job` (also for another org's job)."""
    array_text, separator, task_text = ref.partition("_")
    if not separator:
        return await jobqueries.get_job(session, int(array_text), scope_org_id=scope_org_id)
    array_job_id, task_id = int(array_text), int(task_text)
    job = None
    if 0 < array_job_id < 2**63 and task_id <= MAX_ARRAY_TASK_ID:
        job = await session.scalar(
            select(Job).where(Job.array_job_id == array_job_id, Job.array_task_id == task_id)
        )
    if job is None or (scope_org_id is not None and job.org_id != scope_org_id):
        raise NotFound(f"job {ref} not found")
    return job


def names_array(job: Job, ref: str) -> bool:
    """`ref` is an array's bare id (`42`): actions apply to all its elements."""
    return "_" not in ref and job.array_job_id == job.id


async def cancel_array(
    session: AsyncSession,
    job: Job,
    *,
    actor: str,
    reason: str | None,
    grace_s: float,
    now: datetime | None = None,
) -> list[int]:
    """Cancel every element of `job`'s array: the pending ones in one statement, the active ones
    as `cancel_job` does. Returns the node ids whose agents to wake."""
    now = now or utcnow()
    why = (reason or "cancelled")[:1024]
    array_job_id = job.array_job_id
    cancelled = (
        await session.execute(
            update(_JOBS)
            .where(_JOBS.c.array_job_id == array_job_id, _JOBS.c.state == JobState.PENDING)
            .values(state=JobState.CANCELLED, state_reason=why, ended_at=now)
            .returning(_JOBS.c.id, _JOBS.c.org_id)
        )
    ).all()
    await _events(session, cancelled, now, actor=actor, reason=why, kind="job.state")
    active = (
        await session.scalars(
            select(Job).where(
                Job.array_job_id == array_job_id,
                Job.state.in_([JobState.STARTING, JobState.RUNNING]),
            )
        )
    ).all()
    nodes: set[int] = set()
    for element in active:
        nodes.update(
            await jobactions.cancel_job(
                session, element, actor=actor, reason=reason, grace_s=grace_s
            )
        )
    if not cancelled and not active:
        raise Conflict(f"every element of array {array_job_id} already ended")
    await session.flush()
    await session.refresh(job)
    return sorted(nodes)


async def _events(
    session: AsyncSession,
    rows: Sequence[Any],
    at: datetime,
    *,
    actor: str,
    reason: str | None,
    kind: str,
) -> None:
    if not rows:
        return
    states: dict[str, str | None] = {"from_state": None, "to_state": None}
    if kind == "job.state":
        states = {"from_state": str(JobState.PENDING), "to_state": str(JobState.CANCELLED)}
    await session.execute(
        insert(_EVENTS),
        [
            {
                "at": at,
                "kind": kind,
                "job_id": job_id,
                "org_id": org_id,
                "actor": actor,
                "reason": reason,
                **states,
            }
            for job_id, org_id in rows
        ],
    )
