"""Serving task logs from the LogChunk rows agents ship with their heartbeats.

Offsets are byte offsets in the task's log as the agent wrote it. A chunk's end is the next
chunk's start (or the task's `log_bytes` for the last one): chunks' `data` is decoded text and
may hold fewer or more bytes than it covered, so the stored offsets, not the text, are the truth.
The server keeps the last `task_log_max_bytes` of each task's log (scheduler.services.agents
drops older chunks as new ones arrive): a read of the dropped range gets a marker in their place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Job, LogChunk, Task
from scheduler.db.types import utcnow
from scheduler.services.errors import NotFound
from scheduler.services.logbudget import BUDGET_MARKER

MAX_LOG_RESPONSE_BYTES = 1024 * 1024
LOG_SETTLE = timedelta(seconds=60)
"""How long after a task's end its log counts as complete without the agent's word: an agent
sends the rest within its next few heartbeats, one that has not by then lost it or went away."""


@dataclass(frozen=True, slots=True)
class LogSlice:
    task_id: int | None
    attempt: int | None
    offset: int
    next_offset: int
    data: str
    eof: bool


def _dropped_marker(dropped: int) -> str:
    return f"[fairgpu: {dropped} bytes of log dropped on the server (size cap)]\n"


def _budget_marker(task: Task) -> str:
    return (
        f"[fairgpu: this task's log ({task.log_bytes or 0} bytes) was deleted on the server "
        "for its org's log budget (org_log_max_bytes)]\n"
    )


async def _task(session: AsyncSession, job: Job, rank: int, attempt: int | None) -> Task | None:
    stmt = select(Task).where(Task.job_id == job.id, Task.node_rank == rank)
    if attempt is not None:
        stmt = stmt.where(Task.attempt == attempt)
    return await session.scalar(stmt.order_by(Task.attempt.desc()).limit(1))


async def read_log(
    session: AsyncSession,
    job: Job,
    *,
    rank: int,
    attempt: int | None = None,
    offset: int | None = None,
    tail_bytes: int | None = None,
    max_bytes: int = MAX_LOG_RESPONSE_BYTES,
) -> LogSlice:
    """Bytes from `offset` (or the last `tail_bytes`) of the log of the job's task at `rank`."""
    if rank >= job.num_nodes:
        raise NotFound(f"job {job.id} has no rank {rank} (it has {job.num_nodes} node(s))")
    task = await _task(session, job, rank, attempt)
    if task is None:
        if attempt is not None:
            raise NotFound(f"job {job.id} has no attempt {attempt} at rank {rank}")
        start = offset or 0
        return LogSlice(None, None, start, start, "", job.state.is_terminal)
    if task.log_dropped_at is not None:
        end = task.log_bytes or 0
        return LogSlice(task.id, task.attempt, end, end, _budget_marker(task), True)
    last = await session.scalar(
        select(func.max(LogChunk.offset)).where(LogChunk.task_id == task.id)
    )
    last_chunk = (
        await session.scalar(
            select(LogChunk).where(LogChunk.task_id == task.id, LogChunk.offset == last)
        )
        if last is not None
        else None
    )
    # The agent's own byte count when the heartbeat service keeps it; else the text's size.
    end_total = task.log_bytes or 0
    if last_chunk is not None and end_total <= last_chunk.offset:
        end_total = last_chunk.offset + len(last_chunk.data.encode())
    start = max(0, end_total - tail_bytes) if tail_bytes is not None else max(0, offset or 0)
    # The chunk holding `start` (the one with the greatest offset ≤ start), then what follows.
    first_offset = await session.scalar(
        select(func.max(LogChunk.offset)).where(
            LogChunk.task_id == task.id, LogChunk.offset <= start
        )
    )
    stmt = select(LogChunk.offset, LogChunk.data).where(LogChunk.task_id == task.id)
    stmt = stmt.where(LogChunk.offset >= (first_offset if first_offset is not None else start))
    rows = (await session.execute(stmt.order_by(LogChunk.offset).limit(256))).all()
    parts: list[str] = []
    size = 0
    pos = start
    for i, row in enumerate(rows):
        chunk_end = rows[i + 1].offset if i + 1 < len(rows) else end_total
        chunk_end = max(chunk_end, row.offset)
        if chunk_end <= pos:
            continue
        if row.offset > pos:  # only before the first chunk kept: the server dropped the rest
            parts.append(_dropped_marker(row.offset - pos))
            pos = row.offset
        raw = row.data.encode()
        # The budget's marker stands for the whole range it covers: never a slice of it.
        skip = 0 if row.data == BUDGET_MARKER else max(0, pos - row.offset)
        piece = raw[skip:] if skip else raw
        if size and size + len(piece) > max_bytes:
            break
        parts.append(piece.decode("utf-8", "replace"))
        size += len(piece)
        pos = chunk_end
        if size >= max_bytes:
            break
    eof = pos >= end_total and _log_ended(task)
    return LogSlice(task.id, task.attempt, start, max(pos, start), "".join(parts), eof)


def _log_ended(task: Task) -> bool:
    """Whether no more of the task's log will come: the agent sent its last chunk, or it
    cannot any more. A task's end can reach the server before its log's tail (an agent sends a
    bounded number of chunks per heartbeat, the rest in the next ones), so `terminal` alone
    would let a follower stop short of the last lines."""
    if not task.state.is_terminal:
        return False
    if task.log_complete or task.state is JobState.NODE_FAIL or task.started_at is None:
        return True  # its node is gone, or it never ran there
    ended_at = task.ended_at
    return ended_at is None or utcnow() - ended_at > LOG_SETTLE
