"""Job use cases: submit (idempotent per user and key), find, cancel, explain (holds: holds.py).

Services flush and never commit: the route owns the transaction. Visibility is passed in as
`scope_org_id` (None = every org, for platform admins), so that a job of another org is simply
not found: ids cannot be probed.

Submission is the hot path (hundreds per second): on PostgreSQL it is one prepared statement
built once at import, inserting the job, its PENDING event and its dependencies together, with
ON CONFLICT handling idempotency keys; atomic without an explicit transaction around it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy import ARRAY, BigInteger, String, Table, bindparam, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.signals import parse_signal
from protocol.states import JobState
from scheduler.core.types import PolicyConfig
from scheduler.db import Event, Job, JobDependency, Org, Task
from scheduler.db.types import utcnow
from scheduler.secretenv import HOW_TO_CONFIGURE, seal
from scheduler.services import holds
from scheduler.services.dependencies import AFTEROK, met
from scheduler.services.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    SecretsNotConfigured,
)
from scheduler.services.interactivelimits import check_interactive_time
from scheduler.services.jobstate import STOP_CANCEL, transition_job
from scheduler.services.tenantlimits import (
    SubmitLimits,
    check_submission,
    guard_params,
    submission_guard,
)

DEFAULT_MAX_GRACE_S = PolicyConfig().max_preemption_grace_s
_JOBS: Table = Job.__table__  # type: ignore[assignment]
_EVENTS: Table = Event.__table__  # type: ignore[assignment]
_DEPS: Table = JobDependency.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated submission (the API has checked sizes and formats)."""

    command: list[str]
    name: str = "job"
    script: str | None = None
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    """In clear (and out of repr); `submit_job` seals it before anything is stored."""
    workdir: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    memory_bytes: int | None = None
    gpu_type: str | None = None
    site: str | None = None
    time_limit: int | None = None
    priority_class: str = "normal"
    preemptible: bool = False
    requeue: bool | None = None
    signal: str | None = None
    """The warning signal, normalised (`B:USR1@60`); None: none."""
    hold: bool = False
    interactive: bool = False
    network: str | None = None
    """"private", "host", or None: private where the node can (api/schemas/jobs.py)."""
    depends_on: list[int] = field(default_factory=list)
    """Every job it waits for; `afterok` unless `dependency_kinds` says otherwise."""
    dependency_kinds: dict[int, str] = field(default_factory=dict)
    singleton: bool = False


@dataclass(frozen=True, slots=True)
class Submitted:
    job: Job
    created: bool  # False: an earlier submission with the same idempotency key


async def find_by_idempotency_key(session: AsyncSession, user_id: int, key: str) -> Job | None:
    return await session.scalar(
        select(Job).where(Job.user_id == user_id, Job.idempotency_key == key)
    )


async def get_org(session: AsyncSession, org_id: int) -> Org:
    org = await session.get(Org, org_id)
    if org is None:
        raise NotFound(f"org {org_id} not found")
    return org


def time_limit_of(org: Org | None, asked: int | None, default_s: int, max_s: int) -> int:
    if asked is None:
        asked = (org.default_time_limit_s if org is not None else None) or default_s
    if asked > max_s:
        raise InvalidInput(
            f"time limit {asked} s exceeds the maximum of {max_s} s", max_time_limit_s=max_s
        )
    return asked


def check_signal_lead(signal: str | None, time_limit_s: int, max_grace_s: float) -> None:
    """Refuse a warning signal due before the job starts or beyond the longest grace."""
    if signal is None:
        return
    lead_s = parse_signal(signal).lead_s
    if lead_s > time_limit_s:
        raise InvalidInput(
            f"--signal {signal}: {lead_s} s is more than the time limit of {time_limit_s} s",
            time_limit_s=time_limit_s,
        )
    if lead_s > max_grace_s:
        raise InvalidInput(
            f"--signal {signal}: {lead_s} s is more than the maximum of {max_grace_s:g} s",
            max_preemption_grace_s=max_grace_s,
        )


def preemption_grace_of(job_signal: str | None, grace_s: float, max_grace_s: float) -> float:
    """A preempted job's grace: the configured one, or its `--signal` lead time when longer
    (up to `max_grace_s`)."""
    if job_signal is None:
        return grace_s
    return max(grace_s, min(float(parse_signal(job_signal).lead_s), max_grace_s))


async def check_dependencies(
    session: AsyncSession, org_id: int, ids: Sequence[int], kinds: dict[int, str] | None = None
) -> None:
    """Refuse unknown jobs and dependencies that can no longer be met (`kinds`: the ones that
    are not `afterok`)."""
    if not ids:
        return
    kinds = kinds or {}
    rows = (
        await session.execute(select(Job.id, Job.org_id, Job.state).where(Job.id.in_(ids)))
    ).all()
    found = {r.id: r for r in rows if r.org_id == org_id}
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise InvalidInput(f"unknown job id(s) in depends_on: {unknown}", unknown=unknown)
    dead = [i for i in ids if met(kinds.get(i, AFTEROK), found[i].state) is False]
    if dead:
        raise InvalidInput(
            f"depends_on job(s) {dead} ended so that the dependency can never be met", ended=dead
        )


async def check_image_allowed(session: AsyncSession, org_id: int, image: str) -> None:
    """Refuse an image that the patterns of the org, or of any org above it, do not allow.

    An org without patterns allows any image; a programme's list binds its members too. Only
    submissions are checked: narrowing a list later stops no job already accepted.
    """
    current: int | None = org_id
    seen: set[int] = set()
    while current is not None and current not in seen:  # `seen`: the tree has no cycles
        seen.add(current)
        row = (
            await session.execute(
                select(Org.name, Org.parent_id, Org.image_patterns).where(Org.id == current)
            )
        ).one_or_none()
        if row is None:
            return
        name, current, patterns = row
        if patterns and not any(fnmatchcase(image, p) for p in patterns):
            raise InvalidInput(
                f"image {image!r} is not allowed in org {name}; allowed: {', '.join(patterns)}",
                org=name,
                allowed_images=list(patterns),
            )


def submission_rows(
    *,
    org_id: int,
    user_id: int,
    actor: str,
    spec: JobSpec,
    idempotency_key: str | None,
    time_limit_s: int,
    now: datetime,
    secret_env_ciphertext: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The new job's row and its PENDING event's row (without ids), column by column.

    `spec.secret_env` is never stored: only `secret_env_ciphertext`, its sealed form."""
    values: dict[str, Any] = {
        "org_id": org_id,
        "user_id": user_id,
        "name": spec.name,
        "command": list(spec.command),
        "script": spec.script,
        "image": spec.image,
        "env": dict(spec.env),
        "secret_env_ciphertext": secret_env_ciphertext or None,
        "workdir": spec.workdir,
        "gpus_per_node": spec.gpus_per_node,
        "num_nodes": spec.nodes,
        "memory_bytes": spec.memory_bytes,
        "gpu_type": spec.gpu_type,
        "site": spec.site,
        "time_limit_s": time_limit_s,
        "priority_class": spec.priority_class,
        "preemptible": spec.preemptible,
        "requeue": spec.requeue,
        "signal": spec.signal,
        "held": spec.hold,
        "interactive": spec.interactive,
        "network": spec.network,
        "idempotency_key": idempotency_key,
        "state": JobState.PENDING,
        "submitted_at": now,
        "requeue_count": 0,
        "borrowed": False,
        "singleton": spec.singleton,
        # The same on every node of the gang (FAIRGPU_JOB_SECRET); never shown by the API.
        "job_secret": secrets.token_urlsafe(32),
    }
    event: dict[str, Any] = {
        "at": now,
        "kind": "job.state",
        "org_id": org_id,
        "from_state": None,
        "to_state": str(JobState.PENDING),
        "actor": actor,
        "reason": "submitted (held)" if spec.hold else "submitted",
    }
    return values, event


def new_job(job_id: int, values: dict[str, Any]) -> Job:
    """The Job just inserted from `values`, without reading it back."""
    job = Job(id=job_id, **values)
    job.pending_reasons = job.priority = job.estimated_start_at = None
    job.started_at = job.ended_at = job.state_reason = job.exit_code = None
    return job


async def submit_job(
    session: AsyncSession,
    *,
    org_id: int,
    user_id: int,
    actor: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    default_time_limit_s: int,
    max_time_limit_s: int,
    max_preemption_grace_s: float = DEFAULT_MAX_GRACE_S,
    secret_cipher: MultiFernet | None = None,
    limits: SubmitLimits | None = None,
    now: datetime | None = None,
) -> Submitted:
    """Store a PENDING job and its submit event. The same key from the same user returns the
    job stored the first time (the caller retried after a lost reply), and changes nothing.

    `spec.secret_env` is sealed with `secret_cipher`; without one such a job is refused.
    The org's priority maximum and the pending caps (`limits`) refuse it with 403 or 409."""
    if spec.secret_env and secret_cipher is None:
        raise SecretsNotConfigured(
            f"this server stores no secrets: it has no key to encrypt them ({HOW_TO_CONFIGURE})"
        )
    limits = limits or SubmitLimits()
    limits.check_class(spec.priority_class)
    postgres = session.get_bind().dialect.name == "postgresql"
    org: Org | None = None
    if not postgres:  # PostgreSQL: ON CONFLICT and the limits' guard in the insert below
        if idempotency_key is not None:
            existing = await find_by_idempotency_key(session, user_id, idempotency_key)
            if existing is not None:  # a retry is answered even when a cap is now reached
                return Submitted(existing, created=False)
        org = await get_org(session, org_id)
        await check_submission(
            session, org=org, user_id=user_id, priority_class=spec.priority_class, limits=limits
        )
    if spec.time_limit is None and org is None:
        org = await get_org(session, org_id)
    now = now or utcnow()
    time_limit_s = time_limit_of(org, spec.time_limit, default_time_limit_s, max_time_limit_s)
    check_signal_lead(spec.signal, time_limit_s, max_preemption_grace_s)
    if spec.interactive:
        await check_interactive_time(
            session,
            org_id=org_id,
            time_limit_s=time_limit_s,
            default_s=limits.interactive_max_time_s,
        )
    await check_dependencies(session, org_id, spec.depends_on, spec.dependency_kinds)
    if spec.image is not None:
        await check_image_allowed(session, org_id, spec.image)
    sealed = seal(secret_cipher, spec.secret_env) if secret_cipher and spec.secret_env else None
    values, event = submission_rows(
        org_id=org_id,
        user_id=user_id,
        actor=actor,
        spec=spec,
        idempotency_key=idempotency_key,
        time_limit_s=time_limit_s,
        now=now,
        secret_env_ciphertext=sealed,
    )
    if postgres:
        job_id = await _insert_job_and_event_pg(
            session,
            values,
            event,
            [(d, spec.dependency_kinds.get(d, AFTEROK)) for d in spec.depends_on],
            guard_params(spec.priority_class, limits),
        )
        if job_id is None:  # a job with this key exists (a retry), or a limit was just reached
            existing = (
                await find_by_idempotency_key(session, user_id, idempotency_key)
                if idempotency_key is not None
                else None
            )
            if existing is None:  # say which limit, with its numbers
                await check_submission(
                    session,
                    org=await get_org(session, org_id),
                    user_id=user_id,
                    priority_class=spec.priority_class,
                    limits=limits,
                )
                raise Conflict("a limit on pending jobs was reached; submit again shortly")
            return Submitted(existing, created=False)
        return Submitted(new_job(job_id, values), created=True)
    job = Job(**values)
    session.add(job)
    await session.flush()
    session.add(Event(job_id=job.id, **event))
    session.add_all(
        JobDependency(job_id=job.id, depends_on_id=d, kind=spec.dependency_kinds.get(d, AFTEROK))
        for d in spec.depends_on
    )
    await session.flush()
    return Submitted(job, created=True)


JOB_INSERT_FIELDS = (
    "org_id", "user_id", "name", "command", "image", "env", "workdir", "gpus_per_node",
    "num_nodes", "gpu_type", "site", "time_limit_s", "priority_class", "preemptible", "held",
    "idempotency_key", "state", "submitted_at", "requeue_count", "borrowed", "memory_bytes",
    "job_secret", "secret_env_ciphertext", "script", "singleton", "requeue",
    "signal", "interactive", "network",
)  # fmt: skip
EVENT_INSERT_FIELDS = ("at", "kind", "org_id", "from_state", "to_state", "actor", "reason")


def _build_submit_statement() -> Any:
    """Built once: per request only the parameters change, so nothing is compiled again.

    The job is inserted only when the tenant limits allow it (tenantlimits.submission_guard);
    otherwise, as on an idempotency conflict, nothing is inserted and no id returned.
    """
    job_values = select(
        *(bindparam(f"j_{f}", type_=_JOBS.c[f].type) for f in JOB_INSERT_FIELDS)
    ).where(submission_guard())
    job_cte = (
        pg_insert(_JOBS)
        .from_select(list(JOB_INSERT_FIELDS), job_values)
        .on_conflict_do_nothing(index_elements=["user_id", "idempotency_key"])
        .returning(_JOBS.c.id)
        .cte("new_job")
    )
    params = [bindparam(f"e_{f}", type_=_EVENTS.c[f].type) for f in EVENT_INSERT_FIELDS]
    event_cte = (
        insert(_EVENTS)
        .from_select(["job_id", *EVENT_INSERT_FIELDS], select(job_cte.c.id, *params))
        .returning(_EVENTS.c.id)
        .cte("new_event")
    )
    deps_cte = (
        insert(_DEPS)
        .from_select(
            ["job_id", "depends_on_id", "kind"],
            # Two arrays unnested side by side in the select list go in lockstep.
            select(
                job_cte.c.id,
                func.unnest(bindparam("deps", type_=ARRAY(BigInteger))),
                func.unnest(bindparam("dep_kinds", type_=ARRAY(String))),
            ),
        )
        .returning(_DEPS.c.job_id)
        .cte("new_deps")
    )
    return select(job_cte.c.id).add_cte(event_cte).add_cte(deps_cte)


SUBMIT_PG = _build_submit_statement()


async def _insert_job_and_event_pg(
    session: AsyncSession,
    values: dict[str, Any],
    event: dict[str, Any],
    depends_on: list[tuple[int, str]],
    guard: dict[str, Any],
) -> int | None:
    """The job row, its PENDING event and its dependencies in one statement: one round trip,
    and atomic by itself, so the API can run it outside an explicit transaction.

    A conflicting idempotency key, or a tenant limit the job would pass, inserts nothing and
    returns None.
    """
    params: dict[str, Any] = {f"j_{k}": v for k, v in values.items()}
    params.update({f"e_{k}": v for k, v in event.items()})
    params["deps"] = [job_id for job_id, _ in depends_on]
    params["dep_kinds"] = [kind for _, kind in depends_on]
    params.update(guard)
    job_id: int | None = await session.scalar(SUBMIT_PG, params)
    return job_id


async def get_job(session: AsyncSession, job_id: int, *, scope_org_id: int | None) -> Job:
    """The job, if the caller may see it; NotFound otherwise (also for another org's job)."""
    if not 0 < job_id < 2**63:
        raise NotFound(f"job {job_id} not found")
    job = await session.get(Job, job_id)
    if job is None or (scope_org_id is not None and job.org_id != scope_org_id):
        raise NotFound(f"job {job_id} not found")
    return job


async def dependencies_of(session: AsyncSession, job_ids: Sequence[int]) -> dict[int, list[int]]:
    if not job_ids:
        return {}
    rows = await session.execute(
        select(JobDependency.job_id, JobDependency.depends_on_id)
        .where(JobDependency.job_id.in_(job_ids))
        .order_by(JobDependency.depends_on_id)
    )
    out: dict[int, list[int]] = {}
    for job_id, dep in rows:
        out.setdefault(job_id, []).append(dep)
    return out


def check_may_act(job: Job, *, user_id: int, may_admin_org: bool) -> None:
    """Members act on their own jobs; org admins and platform admins on every job they see."""
    if not may_admin_org and job.user_id != user_id:
        raise Forbidden("only the job's owner or an org admin may change this job")


async def cancel_job(
    session: AsyncSession,
    job: Job,
    *,
    actor: str,
    reason: str | None,
    grace_s: float,
    now: datetime | None = None,
) -> list[int]:
    """Cancel at once when pending; otherwise ask each active task to stop (the job becomes
    CANCELLED when its agent reports the exit). Returns the node ids whose agents to wake."""
    now = now or utcnow()
    if job.state.is_terminal:
        raise Conflict(f"job {job.id} already ended ({job.state})", state=str(job.state))
    why = reason or "cancelled"
    if job.state is JobState.PENDING:
        transition_job(session, job, JobState.CANCELLED, actor=actor, reason=why, at=now)
        await session.flush()
        return []
    tasks = (
        await session.scalars(
            select(Task).where(
                Task.job_id == job.id,
                Task.state.in_([JobState.STARTING, JobState.RUNNING]),
            )
        )
    ).all()
    nodes: list[int] = []
    for task in tasks:
        if task.stop_requested_at is None:
            task.stop_requested_at = now
            task.stop_reason = STOP_CANCEL
            task.stop_grace_s = grace_s
        if task.node_id is not None:
            nodes.append(task.node_id)
    session.add(
        Event(
            at=now,
            kind="job.cancel",
            job_id=job.id,
            org_id=job.org_id,
            actor=actor,
            reason=why[:1024],
            details={"tasks": [t.id for t in tasks]},
        )
    )
    await session.flush()
    return sorted(set(nodes))


def explain(job: Job) -> dict[str, Any]:
    """Why the job waits and until when, as the last scheduling cycle saw it."""
    base: dict[str, Any] = {
        "job_id": job.id,
        "state": job.state,
        "held": job.held,
        "priority": job.priority,
        "reasons": [],
        "estimated_start_at": None,
        "evaluated": job.pending_reasons is not None,
    }
    if job.state is not JobState.PENDING:
        since = job.started_at if job.state.is_active else job.ended_at
        when = f" since {since.isoformat()}" if since else ""
        base["evaluated"] = True
        base["message"] = f"job is {job.state}{when}" + (
            f": {job.state_reason}" if job.state_reason else ""
        )
        return base
    held = holds.hold_reason(job)
    if job.pending_reasons is None:
        base["message"] = "pending; no scheduling cycle has looked at this job yet"
        if held is not None:
            base["reasons"] = [held]
        return base
    base["reasons"] = [
        {
            "code": str(r.get("code", "")),
            "message": str(r.get("message", "")),
            "details": dict(r.get("details") or {}),
        }
        for r in job.pending_reasons
    ]
    if held is not None:  # the hold as it is now, with who held it and why
        base["reasons"] = [held, *(r for r in base["reasons"] if r["code"] != held["code"])]
    base["estimated_start_at"] = job.estimated_start_at
    codes = ", ".join(r["code"] for r in base["reasons"]) or "none"
    base["message"] = f"pending ({codes})"
    return base


async def job_events(
    session: AsyncSession, job_id: int, *, after_id: int | None, limit: int
) -> tuple[list[Event], bool]:
    stmt = select(Event).where(Event.job_id == job_id)
    if after_id is not None:
        stmt = stmt.where(Event.id > after_id)
    rows = list((await session.scalars(stmt.order_by(Event.id).limit(limit + 1))).all())
    return rows[:limit], len(rows) > limit


async def count_pending(session: AsyncSession, org_id: int) -> int:
    """Pending jobs of an org (for quick checks and tests)."""
    return int(
        await session.scalar(
            select(func.count()).where(Job.org_id == org_id, Job.state == JobState.PENDING)
        )
        or 0
    )
