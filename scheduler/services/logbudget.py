"""The log budget: bytes of log text each org keeps in `log_chunks` (`org_log_bytes`), kept in
the transaction that inserts or deletes its chunks, and the room made past `org_log_max_bytes`.

Every deletion of chunks goes through `delete_chunks`, whose DELETE ... RETURNING counts only
the rows it removed: two transactions deleting the same chunks (the retention and an eviction,
two heartbeats of one org) take them off the counter once. Counters change by `add`, one
`bytes = bytes + delta` per org in org order, which PostgreSQL applies under the row's lock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, LargeBinary, Table, cast, delete, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Job, LogChunk, OrgLogBytes, Task
from scheduler.db.engine import dialect_insert

BUDGET_MARKER = "[fairgpu: log output dropped on the server (the org's log budget is full)]\n"
EVICT_TASKS_PER_STEP = 16
_COUNTERS: Table = OrgLogBytes.__table__  # type: ignore[assignment]


def text_bytes(data: str) -> int:
    return len(data.encode())


def stored_bytes(session: AsyncSession) -> ColumnElement[int]:
    """A chunk's text in bytes, as the database counts it (the same as `text_bytes`)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.octet_length(LogChunk.data)
    return func.length(cast(LogChunk.data, LargeBinary))


async def add(session: AsyncSession, deltas: dict[int, int]) -> None:
    """Add each org's delta to its counter (org order, so that two writers never deadlock)."""
    table = _COUNTERS
    for org_id in sorted(deltas):
        if not deltas[org_id]:
            continue
        stmt = dialect_insert(session, table).values(org_id=org_id, bytes=deltas[org_id])
        stmt = stmt.on_conflict_do_update(
            index_elements=["org_id"], set_={"bytes": table.c.bytes + stmt.excluded.bytes}
        )
        await session.execute(stmt)


async def orgs_of(session: AsyncSession, task_ids: Iterable[int]) -> dict[int, int]:
    ids = list(set(task_ids))
    if not ids:
        return {}
    rows = await session.execute(
        select(Task.id, Job.org_id).join(Job, Job.id == Task.job_id).where(Task.id.in_(ids))
    )
    return dict(rows.all())


async def delete_chunks(
    session: AsyncSession, *conditions: ColumnElement[bool], deltas: dict[int, int] | None = None
) -> tuple[int, int]:
    """Delete the chunks that meet `conditions`, taking their bytes off their orgs' counters
    (or off `deltas`, for a caller that applies them with its own, last); returns how many
    rows and bytes were deleted."""
    stmt = delete(LogChunk).where(*conditions).returning(LogChunk.task_id, stored_bytes(session))
    gone = (await session.execute(stmt.execution_options(synchronize_session=False))).all()
    if not gone:
        return 0, 0
    per_task: dict[int, int] = defaultdict(int)
    for task_id, size in gone:
        per_task[task_id] += int(size)
    orgs = await orgs_of(session, per_task)
    changes: dict[int, int] = defaultdict(int) if deltas is None else deltas
    for task_id, size in per_task.items():
        changes[orgs[task_id]] = changes.get(orgs[task_id], 0) - size
    if deltas is None:
        await add(session, changes)
    return len(gone), sum(per_task.values())


async def kept(session: AsyncSession, org_ids: Iterable[int]) -> dict[int, int]:
    rows = await session.execute(
        select(OrgLogBytes.org_id, OrgLogBytes.bytes).where(OrgLogBytes.org_id.in_(set(org_ids)))
    )
    return {org_id: int(size) for org_id, size in rows.all()}


async def _usage(session: AsyncSession, org_id: int, deltas: dict[int, int]) -> int:
    """The org's bytes as this transaction leaves them: the committed counter (read afresh)
    plus what this transaction has yet to apply to it."""
    return (await kept(session, [org_id])).get(org_id, 0) + deltas.get(org_id, 0)


async def make_room(
    session: AsyncSession,
    org_id: int,
    *,
    incoming: int,
    max_bytes: int,
    spare: set[int],
    now: datetime,
    deltas: dict[int, int],
) -> int:
    """Delete whole logs of the org's ended tasks, those that ended first first, until
    `incoming` more bytes fit in `max_bytes` or none is left (the tasks in `spare` are
    skipped); returns the room left for them. Each such task is marked, so that reading its
    log says why it is gone.

    The org's usage is read afresh before each deletion, after the candidates: another
    heartbeat of the org making room at once picks the same oldest task, and whichever
    deletes it second waits for the first to commit and finds it gone. Reading the counter
    then shows the room the first made, and no further log is deleted for room that is
    already there (the candidates are read first, so that a deletion committed in between is
    in the counter too)."""
    while True:
        has_chunks = exists().where(LogChunk.task_id == Task.id)
        stmt = (
            select(Task.id)
            .join(Job, Job.id == Task.job_id)
            .where(
                Job.org_id == org_id,
                Task.ended_at.is_not(None),
                Task.log_dropped_at.is_(None),  # skips those already emptied, unlooked at
                has_chunks,
            )
            .order_by(Task.ended_at, Task.id)
            .limit(EVICT_TASKS_PER_STEP)
        )
        if spare:
            stmt = stmt.where(Task.id.not_in(spare))
        task_ids = list((await session.scalars(stmt)).all())
        for task_id in task_ids:
            room = max_bytes - await _usage(session, org_id, deltas)
            if room >= incoming:
                return room
            rows, _size = await delete_chunks(session, LogChunk.task_id == task_id, deltas=deltas)
            if rows:  # else another transaction deleted them: it says why
                await session.execute(
                    update(Task).where(Task.id == task_id).values(log_dropped_at=now)
                )
        if not task_ids:
            return max_bytes - await _usage(session, org_id, deltas)


async def _ends_with_marker(session: AsyncSession, task_id: int) -> bool:
    last = await session.scalar(
        select(LogChunk.data)
        .where(LogChunk.task_id == task_id)
        .order_by(LogChunk.offset.desc())
        .limit(1)
    )
    return last == BUDGET_MARKER


async def admit(
    session: AsyncSession,
    rows: list[dict[str, Any]],
    *,
    org_of: dict[int, int],
    max_bytes: int,
    now: datetime,
    deltas: dict[int, int],
) -> list[dict[str, Any]]:
    """The chunk rows (task_id, offset, data; in offset order per task) that fit their orgs'
    budgets, after deleting the logs of ended tasks to make room; for a task whose output does
    not fit, one marker row in place of what is dropped (none when its log already ends with
    one). Only the orgs of `rows` are looked at or touched. What the deletions free goes into
    `deltas`, for the caller to apply after all its chunk statements: every writer then locks
    chunks first and counters last (in org order), so none waits for another in a cycle."""
    if max_bytes <= 0 or not rows:
        return rows
    incoming: dict[int, int] = defaultdict(int)
    for row in rows:
        incoming[org_of[row["task_id"]]] += text_bytes(row["data"])
    usage = await kept(session, incoming)
    spare = {row["task_id"] for row in rows}
    room: dict[int, int] = {}
    for org_id in sorted(incoming):
        room[org_id] = max_bytes - usage.get(org_id, 0)
        if incoming[org_id] > room[org_id]:
            room[org_id] = await make_room(
                session,
                org_id,
                incoming=incoming[org_id],
                max_bytes=max_bytes,
                spare=spare,
                now=now,
                deltas=deltas,
            )
    out: list[dict[str, Any]] = []
    dropping: set[int] = set()
    for row in rows:
        task_id = row["task_id"]
        org_id = org_of[task_id]
        size = text_bytes(row["data"])
        if task_id not in dropping and size <= room[org_id]:
            room[org_id] -= size
            out.append(row)
            continue
        if task_id in dropping:
            continue
        dropping.add(task_id)
        stored_before = all(kept_row["task_id"] != task_id for kept_row in out)
        if stored_before and await _ends_with_marker(session, task_id):
            continue
        out.append({"task_id": task_id, "offset": row["offset"], "data": BUDGET_MARKER})
    return out
