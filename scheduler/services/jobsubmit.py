"""Job submission: a PENDING job, idempotent per user and key (reading: jobqueries.py; cancel:
jobactions.py; holds: holds.py).

Services flush and never commit: the route owns the transaction.

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
from scheduler.db import Event, Job, JobDependency, Org, User
from scheduler.db.types import utcnow
from scheduler.secretenv import HOW_TO_CONFIGURE, seal
from scheduler.services.dependencies import AFTEROK, met
from scheduler.services.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    SecretsNotConfigured,
)
from scheduler.services.interactivelimits import check_interactive_time
from scheduler.services.jobactions import DEFAULT_MAX_GRACE_S
from scheduler.services.jobqueries import find_by_idempotency_key
from scheduler.services.rowlocks import lock_owner_row
from scheduler.services.tenantlimits import (
    SubmitLimits,
    check_submission,
    guard_params,
    submission_guard,
)

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
        # The database's one write lock from here: concurrent submissions count in turn.
        await lock_owner_row(session, User, user_id)
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
