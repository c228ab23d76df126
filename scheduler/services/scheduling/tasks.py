"""Ending tasks and their jobs: one rule shared by agent reports, lost nodes and the cycle.

A job is a gang: it ends when every task of its current attempt has ended, and the first task
that ended other than COMPLETED decides the job's state ("first failure wins"). When one task of
a gang fails, the others are asked to stop, since a gang with a missing member cannot progress.
A job that ends PREEMPTED or NODE_FAIL is requeued to PENDING (attempt + 1) when it is
preemptible: a preemptible job declares that it can be restarted, so a lost node costs it only
time. A non-preemptible job ends NODE_FAIL and its owner resubmits. Requeues are capped
(`max_requeues`) and spaced (`not_before`, a delay doubling per requeue): a job that kills
every node it lands on ends NODE_FAIL after a few tries instead of going round the cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Allocation, Job, Task
from scheduler.services.accounting import settle_allocations
from scheduler.services.jobstate import (
    STOP_CANCEL,
    STOP_NODE_LOST,
    STOP_PREEMPT,
    STOP_STALE,
    STOP_TIMEOUT,
    transition_job,
    transition_task,
)
from scheduler.settings import Settings

ACTIVE_STATES = (JobState.STARTING, JobState.RUNNING)

# What a task that was asked to stop ends as, by the reason it was asked.
STOP_REASON_STATE = {
    STOP_CANCEL: JobState.CANCELLED,
    STOP_PREEMPT: JobState.PREEMPTED,
    STOP_TIMEOUT: JobState.TIMEOUT,
    STOP_NODE_LOST: JobState.NODE_FAIL,
    STOP_STALE: JobState.CANCELLED,
}
REQUEUE_STATES = frozenset({JobState.PREEMPTED, JobState.NODE_FAIL})
MAX_REQUEUE_DELAY_S = 3600.0


@dataclass(frozen=True, slots=True)
class RequeuePolicy:
    """How often, and how soon again, a preemptible job is requeued (scheduler/settings.py)."""

    max_requeues: int
    backoff_s: float

    @classmethod
    def of(cls, settings: Settings) -> RequeuePolicy:
        return cls(settings.max_requeues, settings.requeue_backoff_s)

    def delay_s(self, requeue: int) -> float:
        """Seconds the `requeue`-th requeue (1, 2, ...) waits before it may start."""
        return min(self.backoff_s * 2.0 ** min(requeue - 1, 32), MAX_REQUEUE_DELAY_S)


@dataclass
class EndEffects:
    """What ending tasks changed beyond the tasks themselves, for the caller to act on."""

    wake_nodes: set[int] = field(default_factory=set)  # nodes whose tasks were asked to stop
    jobs_ended: list[tuple[int, JobState]] = field(default_factory=list)
    jobs_requeued: list[int] = field(default_factory=list)
    gpus_freed: int = 0


def request_stop(task: Task, reason: str, *, at: datetime, grace_s: float) -> bool:
    """Ask the task's agent to stop it; False when a stop was already asked (the first wins)."""
    if task.stop_requested_at is not None or task.state.is_terminal:
        return False
    task.stop_requested_at = at
    task.stop_reason = reason
    task.stop_grace_s = grace_s
    return True


async def end_task(
    session: AsyncSession,
    task: Task,
    job: Job,
    state: JobState,
    *,
    actor: str,
    at: datetime,
    grace_s: float,
    gpu_weights: dict[str, float],
    requeue: RequeuePolicy,
    reason: str | None = None,
    exit_code: int | None = None,
    signal: int | None = None,
    effects: EndEffects | None = None,
) -> EndEffects:
    """End one task, close its allocations (and charge them), and end its job if it was last."""
    effects = effects or EndEffects()
    if task.state.is_terminal:
        return effects
    # The job's row lock (taken first, as heartbeats take it) orders everyone who ends tasks of
    # one gang: without it two transactions can each see the other's task still running and
    # neither ends the job. Reload job and task: the lock may have waited for another ending.
    await session.execute(
        select(Job)
        .where(Job.id == job.id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )
    await session.refresh(task)
    if task.state.is_terminal:
        return effects
    transition_task(session, task, state, actor=actor, reason=reason, at=at)
    task.exit_code = exit_code
    task.signal = signal
    allocations = list(
        await session.scalars(
            select(Allocation).where(Allocation.task_id == task.id, Allocation.ended_at.is_(None))
        )
    )
    for alloc in allocations:
        alloc.ended_at = max(at, alloc.started_at)
    effects.gpus_freed += len(allocations)
    await settle_allocations(
        session, allocations, preempted=state is JobState.PREEMPTED, gpu_weights=gpu_weights
    )
    if task.attempt != job.requeue_count or not job.state.is_active:
        return effects  # a late report of an earlier attempt: the job has moved on
    siblings = list(
        await session.scalars(
            select(Task).where(
                Task.job_id == job.id, Task.attempt == task.attempt, Task.id != task.id
            )
        )
    )
    live = [t for t in siblings if not t.state.is_terminal]
    if live:
        if state is not JobState.COMPLETED:
            sibling_reason = STOP_NODE_LOST if state is JobState.NODE_FAIL else STOP_CANCEL
            if state is JobState.PREEMPTED:
                sibling_reason = STOP_PREEMPT
            for t in live:
                if request_stop(t, sibling_reason, at=at, grace_s=grace_s) and t.node_id:
                    effects.wake_nodes.add(t.node_id)
        return effects
    _end_job(session, job, [task, *siblings], actor=actor, at=at, requeue=requeue, effects=effects)
    return effects


def _end_job(
    session: AsyncSession,
    job: Job,
    tasks: Iterable[Task],
    *,
    actor: str,
    at: datetime,
    requeue: RequeuePolicy,
    effects: EndEffects,
) -> None:
    ordered = sorted(tasks, key=lambda t: (t.ended_at or at, t.node_rank))
    failures = [t for t in ordered if t.state is not JobState.COMPLETED]
    decisive = failures[0] if failures else min(ordered, key=lambda t: t.node_rank)
    final = decisive.state
    reason = decisive.reason
    requeues = final in REQUEUE_STATES and (
        job.requeue if job.requeue is not None else job.preemptible
    )
    if requeues and job.requeue_count >= requeue.max_requeues:
        requeues = False
        reason = (
            f"{reason or final.value}; not requeued: it was requeued {job.requeue_count} "
            f"time(s) already, the most allowed (max_requeues = {requeue.max_requeues})"
        )
    job.exit_code = decisive.exit_code
    transition_job(session, job, final, actor=actor, reason=reason, at=at)
    job.preempt_deadline = None
    if not requeues:
        effects.jobs_ended.append((job.id, final))
        return
    delay_s = requeue.delay_s(job.requeue_count + 1)
    transition_job(
        session,
        job,
        JobState.PENDING,
        actor=actor,
        reason=f"requeued after {final.value} (attempt {job.requeue_count + 1}); "
        f"may start again in {delay_s:g} s",
        at=at,
        details={"not_before_s": delay_s},
    )
    job.requeue_count += 1
    job.not_before = at + timedelta(seconds=delay_s) if delay_s > 0 else None
    job.started_at = None
    job.ended_at = None
    job.exit_code = None
    job.borrowed = False
    effects.jobs_requeued.append(job.id)
