"""Stream rows (scheduler/db/streams.py): opened under the per-job, per-user and per-org caps,
claimed once by their node, kept alive by their holder, deleted at their end, swept when their
holder is gone.

Services take a session and never commit (the caller owns the transaction).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import and_, delete, false, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Job, Stream
from scheduler.services.errors import TooManyRequests
from scheduler.services.interactive import AttachTarget

StreamKind = Literal["attach", "new", "port"]

CAP_GROUP: dict[str, tuple[str, ...]] = {
    "attach": ("attach", "new"),
    "new": ("attach", "new"),
    "port": ("port",),
}
"""The kinds counted together against a kind's cap: a terminal client and a new shell are both
terminals into the job (`attach`, `attach --new`)."""
MAX_OPEN: dict[str, int] = {"attach": 8, "new": 8, "port": 64}
"""Open streams of one job, per cap group, whichever replicas hold them: 8 terminals (clients of
the job's own terminal, agents/ptyhost.MAX_CLIENTS, and new shells together), and 64 forwarded
connections, what one user's browser tabs need while bounding the streams one tenant can ask a
node's agent to open."""
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


@dataclass(frozen=True, slots=True)
class StreamCaps:
    """The per-tenant bounds on streams, whichever server processes hold them
    (scheduler/settings.py: `max_streams_per_user`, ...)."""

    open_per_user: int = 128
    open_per_org: int = 512
    pending_per_user: int = 32
    pending_per_job: int = 32


@dataclass(frozen=True, slots=True)
class StreamOwner:
    """Who a stream counts against: its user, and their org (None for a platform admin)."""

    user_id: int
    org_id: int | None


# pg_advisory_xact_lock(class, id): openings of one user, and of one org, queue behind each
# other across processes. The two-key form's space is apart from the one-key locks of the
# scheduler lease and the migrations.
USER_LOCK_CLASS = 0x66670001
ORG_LOCK_CLASS = 0x66670002


async def _queue_behind(session: AsyncSession, target: AttachTarget, owner: StreamOwner) -> None:
    """Openings that one count could see pass each other wait here instead, always in the
    order job, user, org (no cycle between two openings). On SQLite the insert takes the
    database's one write lock before the counts, which serialises them alike."""
    # FOR NO KEY UPDATE (as the heartbeat and the apply lock jobs): it queues openings and
    # event recordings of the job behind each other and behind its state's updates, but not
    # behind transactions that only insert rows pointing at the job (KEY SHARE), such as a
    # heartbeat's usage and log chunks, which a plain FOR UPDATE would wait for.
    await session.execute(
        select(Job.id).where(Job.id == target.job_id).with_for_update(key_share=True)
    )
    if session.get_bind().dialect.name != "postgresql":
        return
    locks = [func.pg_advisory_xact_lock(USER_LOCK_CLASS, owner.user_id)]
    if owner.org_id is not None:  # after the user's: PostgreSQL runs a select list in order
        locks.append(func.pg_advisory_xact_lock(ORG_LOCK_CLASS, owner.org_id))
    await session.execute(select(*locks))  # one round trip


async def open_row(
    session: AsyncSession,
    *,
    stream_id: str,
    target: AttachTarget,
    kind: StreamKind,
    port: int | None,
    owner: StreamOwner,
    caps: StreamCaps,
    holder_id: str,
    holder_url: str,
    now: datetime,
    ttl_s: float,
) -> None:
    """A new pending stream, unless a bound is reached already (429): its job's
    `MAX_OPEN[kind]`, or one of `caps`. Every live row counts, whichever process holds it."""
    await _queue_behind(session, target, owner)
    session.add(
        Stream(
            id=stream_id,
            job_id=target.job_id,
            task_id=target.task_id,
            node_id=target.node_id,
            rank=target.rank,
            kind=kind,
            port=port,
            user_id=owner.user_id,
            org_id=owner.org_id,
            holder_id=holder_id,
            holder_url=holder_url,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            alive_at=now,
        )
    )
    await session.flush()
    pending = and_(Stream.claimed_at.is_(None), Stream.expires_at >= now)
    mine = Stream.user_id == owner.user_id
    ours = Stream.org_id == owner.org_id if owner.org_id is not None else false()
    its = Stream.job_id == target.job_id
    counts = (
        await session.execute(
            select(
                func.count().filter(its, Stream.kind.in_(CAP_GROUP[kind])),
                func.count().filter(mine),
                func.count().filter(mine, pending),
                func.count().filter(its, pending),
                func.count().filter(ours),
            ).where(
                Stream.alive_at >= now - timedelta(seconds=STALE_AFTER_S),
                or_(mine, ours, its),
            )
        )
    ).one()
    job_open, user_open, user_pending, job_pending, org_open = (int(n or 0) for n in counts)
    limit = MAX_OPEN[kind]
    if job_open > limit:
        what = "forwarded connections" if kind == "port" else "terminals (attached or new shells)"
        raise TooManyRequests(
            f"job {target.job_id} has {limit} {what} open already; close some first"
        )
    bounds = (
        (user_open, caps.open_per_user, "streams of yours are open"),
        (user_pending, caps.pending_per_user, "streams of yours wait for their node"),
        (job_pending, caps.pending_per_job, f"streams into job {target.job_id} wait for its node"),
        (org_open, caps.open_per_org, "streams of your org are open"),
    )
    for held, cap, what in bounds:
        if held > cap:
            raise TooManyRequests(
                f"{held - 1} {what}, the most allowed at once; retry after 1 s",
                limit=cap,
                retry_after_s=1,
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
