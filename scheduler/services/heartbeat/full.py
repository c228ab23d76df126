"""The full heartbeat: apply a node's samples, task reports and logs in one transaction.

What matters: reports may arrive twice (a lost reply makes the agent resend), so every report
is applied idempotently; a task stays in `start` until the agent has reported it once (the
first report stamps `started_at`, which is how the server knows the agent has it) and in `stop`
until the agent reports it ended; a task the agent runs that the server does not know, or has
already ended, is stopped as stale. The protocol contract is in protocol/agent.py.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, and_, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.agent import GpuSample, Heartbeat, HeartbeatReply, TaskReport, TaskStop
from protocol.states import TERMINAL_TASK_STATES, GpuHealth, JobState
from scheduler.db import Allocation, Event, Gpu, Job, LogChunk, Task
from scheduler.db import Node as NodeRow
from scheduler.db.engine import dialect_insert
from scheduler.db.types import utcnow
from scheduler.services import logbudget
from scheduler.services.accounting import SampleUsage, record_sample_usage
from scheduler.services.agents import issue_node_credential
from scheduler.services.errors import Unauthenticated
from scheduler.services.heartbeat.buffer import max_sample_gap_s, sample_json, usage_of
from scheduler.services.heartbeat.events import gpu_health_event, node_state_event
from scheduler.services.jobstate import STOP_STALE, transition_job, transition_task
from scheduler.services.scheduling.tasks import (
    STOP_REASON_STATE,
    EndEffects,
    RequeuePolicy,
    end_task,
)
from scheduler.services.scheduling.work import node_work, reply
from scheduler.settings import Settings
from scheduler.states import NodeState

_LOGS: Table = LogChunk.__table__  # type: ignore[assignment]
_TASKS: Table = Task.__table__  # type: ignore[assignment]


@dataclass
class HeartbeatOutcome:
    reply: HeartbeatReply
    changed: bool = False  # something the scheduling cycle should see now
    urgent: bool = False  # the request carried news: answer at once, do not hold it
    wake_nodes: set[int] = field(default_factory=set)
    # The node's GPUs as this heartbeat left them (index → uuid, health), for the buffer.
    gpus: dict[int, tuple[str, GpuHealth]] | None = None


async def heartbeat(
    session: AsyncSession,
    *,
    node_id: int,
    body: Heartbeat,
    settings: Settings,
    now: datetime | None = None,
    renew_token_id: int | None = None,
) -> HeartbeatOutcome:
    """Apply the node's samples, task reports and logs; return the work for it. Caller commits.

    With `renew_token_id` (the presented credential, past half its lifetime) the reply carries
    a new credential."""
    now = now or utcnow()
    # Write first: on SQLite the write lock is then taken before anything is read.
    touched = (
        await session.execute(
            update(NodeRow)
            .where(NodeRow.id == node_id)
            .values(last_heartbeat_at=now)
            .returning(NodeRow.name, NodeRow.state)
            .execution_options(synchronize_session=False)
        )
    ).one_or_none()
    if touched is None:
        raise Unauthenticated("this node is no longer registered")
    node_name, node_state = touched
    outcome = HeartbeatOutcome(reply=reply(settings, now))
    actor = f"agent:{node_name}"
    if body.isolation is not None:  # the agent (re)started, perhaps in another mode
        await _set_confinement(
            session, node_id, body.isolation, body.memory_per_gpu_bytes, actor, now, outcome
        )
    if body.capabilities is not None:  # the agent (re)started, perhaps upgraded
        await session.execute(
            update(NodeRow)
            .where(NodeRow.id == node_id)
            .values(capabilities=body.capabilities)
            .execution_options(synchronize_session=False)
        )
    if NodeState(node_state) is NodeState.DOWN:
        node = await session.get(NodeRow, node_id)
        assert node is not None
        session.add(
            node_state_event(
                node_id,
                node.state,
                NodeState.READY,
                actor=actor,
                reason="heartbeat received again",
                at=now,
            )
        )
        node.state = NodeState.READY
        node.state_reason = None
        outcome.changed = outcome.urgent = True
    if body.samples:
        await _apply_samples(session, node_id, node_name, body.samples, settings, now, outcome)
    stale: set[int] = set()
    effects = EndEffects()
    if body.tasks:
        await _apply_reports(
            session, node_id, body.tasks, settings, now, actor, outcome, stale, effects
        )
    if body.logs:
        await _apply_logs(session, node_id, body, settings)
    await session.flush()
    outcome.wake_nodes = effects.wake_nodes - {node_id}
    if effects.gpus_freed or effects.jobs_requeued:
        outcome.changed = True
    work = await node_work(session, node_id=node_id, settings=settings)
    ended: set[int] = set()
    for task, job in work.unreported:
        # Asked to stop before the agent ever reported it: the agent ignores stops for tasks it
        # does not know, so the server ends it (a late live report gets a stale stop).
        await end_task(
            session,
            task,
            job,
            STOP_REASON_STATE.get(task.stop_reason or "", JobState.CANCELLED),
            actor=actor,
            at=now,
            grace_s=settings.policy.preemption_grace_s,
            gpu_weights=dict(settings.policy.gpu_weights),
            requeue=RequeuePolicy.of(settings),
            reason=f"stopped ({task.stop_reason}) before the node started it",
            effects=effects,
        )
        ended.add(task.id)
    for failed in work.unbuildable:
        # Its job does not fit the agent protocol: it fails alone, before the node sees it.
        await end_task(
            session,
            failed.task,
            failed.job,
            JobState.FAILED,
            actor="server",
            at=now,
            grace_s=settings.policy.preemption_grace_s,
            gpu_weights=dict(settings.policy.gpu_weights),
            requeue=RequeuePolicy.of(settings),
            reason=f"cannot be sent to node {node_name}: {failed.error}",
            effects=effects,
        )
    stops = work.stops
    if ended or work.unbuildable:
        outcome.changed = True
        outcome.wake_nodes = effects.wake_nodes - {node_id}
        stops = [stop for stop in stops if stop.task_id not in ended]
        await session.flush()
    stops.extend(
        TaskStop(task_id=t, reason=STOP_STALE, grace_s=settings.policy.preemption_grace_s)
        for t in sorted(stale)
    )
    outcome.reply = reply(settings, now, work.starts, stops)
    if renew_token_id is not None:
        node = await session.get(NodeRow, node_id)
        assert node is not None
        renewed = await issue_node_credential(
            session, node, site_id=node.site_id, settings=settings, now=now,
            keep_token_id=renew_token_id,
        )  # fmt: skip
        outcome.reply = outcome.reply.model_copy(update={"credential": renewed})
        outcome.urgent = True  # not held: a held reply would not carry it
    return outcome


async def _set_confinement(
    session: AsyncSession,
    node_id: int,
    isolation: str,
    memory: int | None,
    actor: str,
    now: datetime,
    outcome: HeartbeatOutcome,
) -> None:
    """Store the mode and memory share the agent reports when it (re)starts (a share of None:
    an older agent, or one that sets no limit, so unknown); a change is news for the
    scheduler, and a change of mode an event."""
    before = (
        await session.execute(
            select(NodeRow.isolation, NodeRow.memory_per_gpu_bytes).where(NodeRow.id == node_id)
        )
    ).one()
    if tuple(before) == (isolation, memory):
        return
    await session.execute(
        update(NodeRow)
        .where(NodeRow.id == node_id)
        .values(isolation=isolation, memory_per_gpu_bytes=memory)
        .execution_options(synchronize_session=False)
    )
    if before.isolation != isolation:
        session.add(
            Event(
                at=now,
                kind="node.isolation",
                node_id=node_id,
                from_state=before.isolation,
                to_state=isolation,
                actor=actor,
                reason="reported by the agent",
            )
        )
    outcome.changed = True  # which jobs the node may run has changed


async def _apply_samples(
    session: AsyncSession,
    node_id: int,
    node_name: str,
    samples: list[GpuSample],
    settings: Settings,
    now: datetime,
    outcome: HeartbeatOutcome,
) -> None:
    gpus: dict[int, Gpu] = {}
    holding: dict[int, Allocation] = {}
    open_allocation = and_(Allocation.gpu_id == Gpu.id, Allocation.ended_at.is_(None))
    for row, held in await session.execute(
        select(Gpu, Allocation).outerjoin(Allocation, open_allocation).where(Gpu.node_id == node_id)
    ):
        gpus[row.index] = row
        if held is not None:
            holding[row.id] = held
    usages: list[SampleUsage] = []
    max_gap_s = max_sample_gap_s(settings)
    for sample in samples:
        gpu = gpus.get(sample.index)
        if gpu is None or gpu.uuid != sample.uuid:
            continue  # a GPU this node did not register: ignore rather than guess
        previous_at = gpu.last_sample_at
        if previous_at is not None and sample.sampled_at <= previous_at:
            continue  # resent or out of order: already counted
        alloc = holding.get(gpu.id)
        if alloc is not None:
            usage = usage_of(
                alloc,
                sample,
                previous_at=previous_at,
                previous_energy=(gpu.last_sample or {}).get("energy_joules"),
                max_gap_s=max_gap_s,
            )
            if usage is not None:
                usages.append(usage)
        gpu.last_sample = sample_json(sample)
        gpu.last_sample_at = sample.sampled_at
        health = GpuHealth(sample.health)
        if health is not gpu.health:
            session.add(
                gpu_health_event(
                    node_id,
                    gpu_index=gpu.index,
                    uuid=gpu.uuid,
                    was=gpu.health,
                    to=health,
                    reason=sample.health_reason,
                    xids=sample.xid_events,
                    actor=f"agent:{node_name}",
                    at=now,
                )
            )
            gpu.health = health
            gpu.health_reason = sample.health_reason or None
            outcome.changed = True
    outcome.gpus = {g.index: (g.uuid, g.health) for g in gpus.values()}
    await record_sample_usage(session, usages)


def _end_state(report: TaskReport, task: Task) -> tuple[JobState, str]:
    """What a final report means for the task, as the protocol contract says."""
    asked = STOP_REASON_STATE.get(task.stop_reason or "") if task.stop_requested_at else None
    detail = report.reason or ""
    if report.state == "lost":
        return JobState.NODE_FAIL, detail or "the agent lost the task"
    if report.state == "timeout":
        return JobState.TIMEOUT, detail or "time limit reached"
    if report.state == "failed_to_start":
        return JobState.FAILED, detail or "failed to start"
    if asked is not None and report.state in ("stopped", "exited"):
        return asked, f"stopped: {task.stop_reason}"
    if report.state == "exited":
        if report.exit_code == 0:
            return JobState.COMPLETED, detail or "exit code 0"
        if report.exit_code is None:
            return JobState.FAILED, detail or f"killed by signal {report.signal}"
        return JobState.FAILED, detail or f"exit code {report.exit_code}"
    return JobState.FAILED, detail or "stopped on the node without a request"


async def _apply_reports(
    session: AsyncSession,
    node_id: int,
    reports: list[TaskReport],
    settings: Settings,
    now: datetime,
    actor: str,
    outcome: HeartbeatOutcome,
    stale: set[int],
    effects: EndEffects,
) -> None:
    ids = [r.task_id for r in reports]
    # Lock the reported tasks' jobs (in id order, so two heartbeats cannot deadlock) before
    # reading any task: two nodes ending the last two tasks of a gang at once would otherwise
    # each see the other's task still running (READ COMMITTED) and neither would end the job.
    # Statements after the lock see what the other transaction committed. FOR NO KEY UPDATE,
    # not FOR UPDATE: rows that merely reference the job (events, tasks) take KEY SHARE locks,
    # which must not wait for it. (SQLite serialises writers anyway; nothing is rendered there.)
    await session.execute(
        select(Job.id)
        .where(Job.id.in_(select(Task.job_id).where(Task.id.in_(ids))))
        .order_by(Job.id)
        .with_for_update(key_share=True)
    )
    found = {
        task.id: (task, job)
        for task, job in (
            await session.execute(
                select(Task, Job).join(Job, Job.id == Task.job_id).where(Task.id.in_(ids))
            )
        )
    }
    weights = dict(settings.policy.gpu_weights)
    for report in reports:
        live = report.state not in TERMINAL_TASK_STATES
        pair = found.get(report.task_id)
        if pair is None or pair[0].node_id != node_id or pair[0].state.is_terminal:
            if live:
                stale.add(report.task_id)
            continue
        task, job = pair
        if task.started_at is None:  # the first report: the agent has the task
            task.started_at = report.started_at or now
            outcome.urgent = True
        if report.state == "running" and task.state is JobState.STARTING:
            transition_task(session, task, JobState.RUNNING, actor=actor, at=now)
            if job.state is JobState.STARTING and task.attempt == job.requeue_count:
                transition_job(session, job, JobState.RUNNING, actor=actor, at=now)
            outcome.urgent = True
        elif not live:
            state, reason = _end_state(report, task)
            await end_task(
                session,
                task,
                job,
                state,
                actor=actor,
                at=report.ended_at or now,
                grace_s=settings.policy.preemption_grace_s,
                gpu_weights=weights,
                requeue=RequeuePolicy.of(settings),
                reason=reason,
                exit_code=report.exit_code,
                signal=report.signal,
                effects=effects,
            )
            outcome.urgent = outcome.changed = True


async def _apply_logs(
    session: AsyncSession, node_id: int, body: Heartbeat, settings: Settings
) -> None:
    """Append new chunks; a chunk whose end is not beyond what is held is a resend.

    A task keeps at most `task_log_max_bytes` of log: the chunks that start before its new end
    minus that are deleted (one indexed range per task, only what this heartbeat pushed out),
    never the newest one. Reading that range gives a marker (scheduler.services.logs). Its
    org keeps at most `org_log_max_bytes` of all its tasks' logs (scheduler.services.logbudget).
    """
    task_ids = {c.task_id for c in body.logs}
    found = (
        await session.execute(
            select(Task.id, Task.log_bytes, Task.log_dropped_at, Job.org_id)
            .join(Job, Job.id == Task.job_id)
            .where(Task.id.in_(task_ids), Task.node_id == node_id)
        )
    ).all()
    held = {row.id: row.log_bytes for row in found}
    org_of = {row.id: row.org_id for row in found}
    gone = {row.id for row in found if row.log_dropped_at is not None}
    rows: list[dict[str, Any]] = []
    advanced: set[int] = set()
    complete: set[int] = set()
    for chunk in sorted(body.logs, key=lambda c: (c.task_id, c.offset)):
        upto = held.get(chunk.task_id)
        if upto is None:
            continue
        if chunk.eof:  # the chunks before it came first (in order, this or earlier heartbeats)
            complete.add(chunk.task_id)
        if chunk.next_offset <= upto:
            continue
        held[chunk.task_id] = chunk.next_offset
        advanced.add(chunk.task_id)
        if chunk.task_id not in gone:  # else the org's log budget deleted the task's log
            rows.append({"task_id": chunk.task_id, "offset": chunk.offset, "data": chunk.data})
    if complete:
        await session.execute(update(Task).where(Task.id.in_(complete)).values(log_complete=True))
    if not advanced:
        return
    now = utcnow()
    # Counters change last, after every chunk statement (see logbudget.admit).
    deltas: dict[int, int] = defaultdict(int)
    rows = await logbudget.admit(
        session, rows, org_of=org_of, max_bytes=settings.org_log_max_bytes, now=now, deltas=deltas
    )
    conn = await session.connection()
    await conn.execute(
        update(_TASKS)
        .where(_TASKS.c.id == bindparam("b_id"))
        .values(log_bytes=bindparam("b_bytes")),
        [{"b_id": t, "b_bytes": held[t]} for t in sorted(advanced)],
    )
    if rows:
        await _store_chunks(session, rows, org_of, held, now, deltas, settings.task_log_max_bytes)
    await logbudget.add(session, deltas)


async def _store_chunks(
    session: AsyncSession,
    rows: list[dict[str, Any]],
    org_of: dict[int, int],
    held: dict[int, int],
    now: datetime,
    deltas: dict[int, int],
    max_bytes: int,
) -> None:
    """Insert the rows (a resend's conflict is not counted), then cut each task to `max_bytes`
    (never its newest chunk); the bytes stored and cut go into `deltas`."""
    for row in rows:
        row["created_at"] = now
    stmt = dialect_insert(session, _LOGS).values(rows).on_conflict_do_nothing()
    stmt = stmt.returning(_LOGS.c.task_id, _LOGS.c.offset)
    inserted = {(row[0], row[1]) for row in (await session.execute(stmt)).all()}
    newest: dict[int, int] = {}
    for row in rows:
        if (row["task_id"], row["offset"]) in inserted:
            deltas[org_of[row["task_id"]]] += logbudget.text_bytes(row["data"])
        newest[row["task_id"]] = max(row["offset"], newest.get(row["task_id"], row["offset"]))
    for task_id, newest_offset in sorted(newest.items()):
        if held[task_id] > max_bytes:
            cut = min(held[task_id] - max_bytes, newest_offset)
            await logbudget.delete_chunks(
                session, LogChunk.task_id == task_id, LogChunk.offset < cut, deltas=deltas
            )
