"""What a node must do now: tasks to start (not yet acknowledged) and to stop (not yet ended).

Read by every heartbeat and by every re-check of a held long-poll, so it is one indexed query
on `tasks.node_id` when there is nothing to do, and a few more only when there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.fernet import MultiFernet
from pydantic import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from protocol.agent import HeartbeatReply, TaskSignal, TaskSpec, TaskStop
from protocol.script import script_command
from protocol.signals import parse_signal
from scheduler.db import Allocation, Gpu, Job, Org, Task
from scheduler.db import Node as NodeRow
from scheduler.db.types import utcnow
from scheduler.secretenv import SecretsUnreadable, settings_cipher, unseal
from scheduler.services.arrays import array_env
from scheduler.services.interactivelimits import interactive_idle_timeout_of
from scheduler.services.jobstate import STOP_PREEMPT
from scheduler.services.scheduling.tasks import ACTIVE_STATES
from scheduler.settings import Settings

MASTER_PORT_BASE = 29_500  # torchrun's default; offset per job so gangs sharing a node differ
MASTER_PORT_SPAN = 10_000


def reply(
    settings: Settings,
    now: datetime,
    starts: list[TaskSpec] | None = None,
    stops: list[TaskStop] | None = None,
) -> HeartbeatReply:
    return HeartbeatReply(
        start=starts or [],
        stop=stops or [],
        heartbeat_interval_s=settings.heartbeat_interval_s,
        server_time=now,
    )


@dataclass(frozen=True, slots=True)
class Unbuildable:
    """A task whose job does not fit the agent protocol: it fails alone, its node carries on."""

    task: Task
    job: Job
    error: str


@dataclass
class NodeWork:
    starts: list[TaskSpec] = field(default_factory=list)
    stops: list[TaskStop] = field(default_factory=list)
    unreported: list[tuple[Task, Job]] = field(default_factory=list)
    """Asked to stop before the agent ever reported them."""
    unbuildable: list[Unbuildable] = field(default_factory=list)
    """To start, but no TaskSpec can be built for them: the caller fails them."""


def reply_json(reply: HeartbeatReply) -> str:
    """The reply as sent. `credential`, `streams` and the tasks' `signal`, `pty` and
    `idle_timeout_s` are left out unless set: an agent older than those fields refuses unknown
    fields, and only a renewal, an attach, a job with `--signal` or an interactive job needs
    them."""
    exclude: dict[str, Any] = {}
    if reply.credential is None:
        exclude["credential"] = True
    if not reply.streams:
        exclude["streams"] = True
    optional = ("signal", "pty", "idle_timeout_s")
    starts = {
        i: unset
        for i, spec in enumerate(reply.start)
        if (unset := {name for name in optional if getattr(spec, name) is None})
    }
    if starts:
        exclude["start"] = starts
    stops = {i: {"signal"} for i, stop in enumerate(reply.stop) if stop.signal is None}
    if stops:
        exclude["stop"] = stops
    return reply.model_dump_json(exclude=exclude or None)


async def node_work(session: AsyncSession, *, node_id: int, settings: Settings) -> NodeWork:
    """Tasks the node must start (not yet acknowledged) and stop (asked, not yet ended)."""
    rows = (
        await session.execute(
            select(Task, Job)
            .join(Job, Job.id == Task.job_id)
            .options(undefer(Job.script))
            .where(
                Task.node_id == node_id,
                Task.state.in_(ACTIVE_STATES),
                or_(Task.stop_requested_at.is_not(None), Task.started_at.is_(None)),
            )
            .order_by(Task.id)
        )
    ).all()
    work = NodeWork()
    if not rows:
        return work
    needs = any(j.signal is not None or j.interactive or j.network != "host" for _, j in rows)
    capabilities = await _capabilities(session, node_id) if needs else set()
    signals, terminals = "signal" in capabilities, "pty" in capabilities
    private = "netns" in capabilities
    work.stops = [
        TaskStop(
            task_id=t.id,
            reason=t.stop_reason or "",
            grace_s=t.stop_grace_s
            if t.stop_grace_s is not None
            else settings.policy.preemption_grace_s,
            signal=True
            if signals and j.signal is not None and t.stop_reason == STOP_PREEMPT
            else None,
        )
        for t, j in rows
        if t.stop_requested_at is not None
    ]
    to_start = [(t, j) for t, j in rows if t.stop_requested_at is None]
    work.unreported = [
        (t, j) for t, j in rows if t.stop_requested_at is not None and t.started_at is None
    ]
    work.starts = await _task_specs(
        session,
        to_start,
        work.unbuildable,
        secret_cipher=settings_cipher(settings),
        signals=signals,
        terminals=terminals,
        private=private,
        idle_default_s=settings.interactive_idle_timeout_s,
    )
    return work


async def _capabilities(session: AsyncSession, node_id: int) -> set[str]:
    """What the node's agent says it can do. One that does not say "signal" (older than
    `capabilities`) may refuse every reply that carries a warning signal, which would stall the
    whole node: it gets the job without it (SIGTERM at the time limit and at a preemption).
    One that does not say "pty" runs an interactive job's rank 0 without a terminal. One that
    says "netns" gives a one-node job a network namespace of its own unless it asks for the
    node's."""
    capabilities = await session.scalar(select(NodeRow.capabilities).where(NodeRow.id == node_id))
    return set(capabilities or ())


async def _task_specs(
    session: AsyncSession,
    pairs: list[tuple[Task, Job]],
    unbuildable: list[Unbuildable],
    *,
    secret_cipher: MultiFernet | None,
    signals: bool = True,
    terminals: bool = True,
    private: bool = False,
    idle_default_s: int = 0,
) -> list[TaskSpec]:
    if not pairs:
        return []
    task_ids = [t.id for t, _ in pairs]
    gpus: dict[int, list[tuple[int, str]]] = {}
    for task_id, index, uuid in await session.execute(
        select(Allocation.task_id, Gpu.index, Gpu.uuid)
        .join(Gpu, Gpu.id == Allocation.gpu_id)
        .where(Allocation.task_id.in_(task_ids), Allocation.ended_at.is_(None))
    ):
        gpus.setdefault(task_id, []).append((index, uuid))
    gang_jobs = {j.id: j.requeue_count for _, j in pairs if j.num_nodes > 1}
    masters: dict[int, str] = {}
    if gang_jobs:
        for job_id, attempt, address in await session.execute(
            select(Task.job_id, Task.attempt, NodeRow.address)
            .join(NodeRow, NodeRow.id == Task.node_id)
            .where(Task.job_id.in_(list(gang_jobs)), Task.node_rank == 0)
        ):
            if gang_jobs.get(job_id) == attempt:
                masters[job_id] = address
    array_ids = {j.array_job_id for _, j in pairs if j.array_job_id is not None}
    array_stats: dict[int, tuple[int, int, int]] = {}
    if array_ids:
        for array_job_id, count, low, high in await session.execute(  # all non-NULL here
            select(
                Job.array_job_id,
                func.count(),
                func.min(Job.array_task_id),
                func.max(Job.array_task_id),
            )
            .where(Job.array_job_id.in_(array_ids))
            .group_by(Job.array_job_id)
        ):
            array_stats[array_job_id] = (count, low, high)  # type: ignore[index,assignment]
    org_ids = {j.org_id for _, j in pairs}
    orgs = dict((await session.execute(select(Org.id, Org.name).where(Org.id.in_(org_ids)))).all())
    # The idle timeout of each org with a terminal to start (few: rank 0 of interactive jobs).
    idle_s = {
        org_id: await interactive_idle_timeout_of(session, org_id, idle_default_s)
        for org_id in {j.org_id for t, j in pairs if j.interactive and t.node_rank == 0}
    }
    specs: list[TaskSpec] = []
    for task, job in pairs:
        try:
            specs.append(
                task_spec(
                    task,
                    job,
                    org=orgs.get(job.org_id, ""),
                    gpus=sorted(gpus.get(task.id, [])),
                    master_addr=masters.get(job.id),
                    secret_cipher=secret_cipher,
                    array_stats=array_stats.get(job.array_job_id or 0),
                    signals=signals,
                    terminals=terminals,
                    private=private,
                    idle_timeout_s=idle_s.get(job.org_id, 0),
                )
            )
        except ValidationError as error:
            unbuildable.append(Unbuildable(task, job, _first_error(error)))
        except (SecretsUnreadable, ValueError) as error:  # ValueError: a script too long to run
            unbuildable.append(Unbuildable(task, job, str(error)))
    return specs


def task_spec(
    task: Task,
    job: Job,
    *,
    org: str,
    gpus: list[tuple[int, str]],
    master_addr: str | None,
    secret_cipher: MultiFernet | None = None,
    array_stats: tuple[int, int, int] | None = None,
    signals: bool = True,
    terminals: bool = True,
    private: bool = False,
    idle_timeout_s: int = 0,
) -> TaskSpec:
    """What the agent is sent to start `task`; `gpus` are its (index, uuid) in index order.

    The job's secret_env is decrypted here, the one place it is ever in clear on the server,
    and sent in the spec's `env` (the agent keeps no copy of `env` on disk). An array's
    element also gets FAIRGPU_ARRAY_* from `array_stats`: (count, min, max) of its task ids;
    every task FAIRGPU_RESTART_COUNT (and Slurm's SLURM_RESTART_COUNT). Without `signals` (a
    node whose agent cannot take them) the job's warning signal is left out; without
    `terminals`, an interactive job's rank 0 runs without a terminal (`pty`). With `private`
    (the node can make network namespaces) a one-node job without an image that leaves its
    `--network` unsaid runs in one of its own; one that asks for it does wherever it was
    placed (on such nodes only). A terminal gets `idle_timeout_s` (0: none), which the agent
    enforces.

    Raises ValidationError when the stored job does not fit the protocol (it was stored under
    other limits), SecretsUnreadable when no configured key opens its secrets: the caller fails
    that task alone.
    """
    gang = job.num_nodes > 1
    pty = job.interactive and task.node_rank == 0 and terminals
    env = dict(job.env or {})
    env.update(unseal(secret_cipher, job.secret_env_ciphertext or {}))
    env.update(array_env(job, array_stats))
    # How many times the job was requeued before this attempt: a checkpointing job resumes.
    env["FAIRGPU_RESTART_COUNT"] = env["SLURM_RESTART_COUNT"] = str(job.requeue_count or 0)
    return TaskSpec(
        task_id=task.id,
        job_id=job.id,
        org=org,
        org_id=job.org_id,
        node_rank=task.node_rank,
        num_nodes=job.num_nodes,
        gpus=[i for i, _ in gpus],
        gpu_uuids=[u for _, u in gpus],
        command=script_command(job.script, job.command) if job.script else list(job.command),
        env=env,
        workdir=job.workdir,
        image=job.image,
        time_limit_s=float(job.time_limit_s),
        master_addr=master_addr if gang else None,
        master_port=MASTER_PORT_BASE + job.id % MASTER_PORT_SPAN if gang else None,
        memory_bytes=job.memory_bytes,
        job_secret=job.job_secret,
        signal=_task_signal(job.signal) if signals else None,
        pty=True if pty else None,
        idle_timeout_s=float(idle_timeout_s) if pty and idle_timeout_s > 0 else None,
        network="private" if _private(job, private) else None,
    )


def _private(job: Job, node_can: bool) -> bool:
    if job.network is not None:
        return job.network == "private"
    # docker cannot join a namespace the agent makes: a job with an image asks for it itself.
    return node_can and job.num_nodes == 1 and job.image is None


def _task_signal(text: str | None) -> TaskSignal | None:
    if text is None:
        return None
    warning = parse_signal(text)
    return TaskSignal(name=warning.name, lead_s=warning.lead_s, batch_only=warning.batch_only)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


async def pending_reply(
    session: AsyncSession, *, node_id: int, settings: Settings
) -> HeartbeatReply | None:
    """For a held heartbeat: a reply when the node has work now, else None. Read only.

    A task that cannot be built ends the hold too (with what can be sent): the node's next
    heartbeat takes the full path, which fails that task in a transaction.
    """
    work = await node_work(session, node_id=node_id, settings=settings)
    if not work.starts and not work.stops and not work.unbuildable:
        return None
    return reply(settings, utcnow(), work.starts, work.stops)
