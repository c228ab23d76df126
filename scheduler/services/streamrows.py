"""Stream rows (scheduler/db/streams.py): opened under the per-job caps, claimed once by their
node, kept alive by their holder, deleted at their end, swept when their holder is gone.

Services take a session and never commit (the caller owns the transaction).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Job, Stream
from scheduler.services.errors import TooManyRequests
from scheduler.services.interactive import AttachTarget

StreamKind = Literal["attach", "port"]

MAX_OPEN: dict[str, int] = {"attach": 8, "port": 64}
"""Open streams of one job, per kind, whichever replicas hold them: a terminal takes at most 8
clients (agents/ptyhost.MAX_CLIENTS), and 64 forwarded connections are what one user's browser
tabs need while bounding the streams one tenant can ask a node's agent to open."""
ALIVE_REFRESH_S = 30.0
"""How often a server process marks the rows it holds as alive."""
STALE_AFTER_S = 120.0
"""A row not marked alive for this long belongs to a process that is gone: it no longer counts
against the caps and is swept."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Claimed:
    """Who holds the user's side of a stream just claimed by its node."""

    holder_id: str
    holder_url: str
    job_id: int
    kind: str


async def open_row(
    session: AsyncSession,
    *,
    stream_id: str,
    target: AttachTarget,
    kind: StreamKind,
    port: int | None,
    holder_id: str,
    holder_url: str,
    now: datetime,
    ttl_s: float,
) -> None:
    """A new pending stream, unless its job has `MAX_OPEN[kind]` open already (429)."""
    # Openings of one job queue behind each other: on PostgreSQL the job's row is locked; on
    # SQLite the insert takes the database's one write lock before the count below.
    await session.execute(select(Job.id).where(Job.id == target.job_id).with_for_update())
    session.add(
        Stream(
            id=stream_id,
            job_id=target.job_id,
            task_id=target.task_id,
            node_id=target.node_id,
            rank=target.rank,
            kind=kind,
            port=port,
            holder_id=holder_id,
            holder_url=holder_url,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            alive_at=now,
        )
    )
    await session.flush()
    open_now = await session.scalar(
        select(func.count())
        .select_from(Stream)
        .where(
            Stream.job_id == target.job_id,
            Stream.kind == kind,
            Stream.alive_at >= now - timedelta(seconds=STALE_AFTER_S),
        )
    )
    limit = MAX_OPEN[kind]
    if (open_now or 0) > limit:
        what = "forwarded connections" if kind == "port" else "terminal clients"
        raise TooManyRequests(
            f"job {target.job_id} has {limit} {what} open already; close some first"
        )


async def claim_row(
    session: AsyncSession, *, stream_id: str, node_id: int, relay_secret: str, now: datetime
) -> Claimed | None:
    """The stream, claimed for good, if it is pending for this node and has not expired;
    `relay_secret` (its hash) is what the claimer will present to the holder."""
    row = (
        await session.execute(
            update(Stream)
            .where(
                Stream.id == stream_id,
                Stream.node_id == node_id,
                Stream.claimed_at.is_(None),
                Stream.expires_at >= now,
            )
            .values(claimed_at=now, relay_secret_hash=secret_hash(relay_secret))
            .returning(Stream.holder_id, Stream.holder_url, Stream.job_id, Stream.kind)
        )
    ).first()
    if row is None:
        return None
    return Claimed(holder_id=row[0], holder_url=row[1], job_id=row[2], kind=row[3])


async def relay_secret_ok(
    session: AsyncSession, *, stream_id: str, holder_id: str, secret: str
) -> bool:
    """Whether `secret` is the one the stream's claimer chose (for the holder's relay route)."""
    stored = await session.scalar(
        select(Stream.relay_secret_hash).where(
            Stream.id == stream_id,
            Stream.holder_id == holder_id,
            Stream.claimed_at.is_not(None),
        )
    )
    return stored is not None and hmac.compare_digest(stored, secret_hash(secret))


async def end_rows(session: AsyncSession, stream_ids: list[str]) -> None:
    if stream_ids:
        await session.execute(delete(Stream).where(Stream.id.in_(stream_ids)))


async def keep_alive(session: AsyncSession, *, holder_id: str, now: datetime) -> None:
    """The holder's rows are alive, and rows of holders gone for STALE_AFTER_S are swept."""
    await session.execute(update(Stream).where(Stream.holder_id == holder_id).values(alive_at=now))
    await session.execute(
        delete(Stream).where(Stream.alive_at < now - timedelta(seconds=STALE_AFTER_S))
    )


async def pending_rows(session: AsyncSession, *, now: datetime) -> list[Stream]:
    """Every stream waiting for its node's agent (a process that may have missed news)."""
    rows = await session.scalars(
        select(Stream).where(Stream.claimed_at.is_(None), Stream.expires_at >= now).limit(10_000)
    )
    return list(rows)
