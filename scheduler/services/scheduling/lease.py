"""The scheduler lease: exactly one replica runs the cycle, and a deposed one applies nothing.

On PostgreSQL the lease is a session-level advisory lock held on a dedicated connection: when
the holder dies its connection drops and PostgreSQL frees the lock, so a standby that keeps
trying takes over at once (TCP keepalives bound how long a silently vanished holder keeps it).
On acquiring, the holder bumps the epoch of the `scheduler_lease` row. Every apply transaction
locks that row (`SELECT … FOR UPDATE`) and proceeds only if the epoch is still its own, so a
leader that lost its lock without noticing has its decisions refused: fencing, not hope.

With SQLite there is one server process: it takes the row directly (or after the previous
holder's `expires_at` passed) and renews it every cycle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from datetime import datetime, timedelta

from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from scheduler.db import SchedulerLease
from scheduler.db.engine import sqlstate
from scheduler.db.types import utcnow

log = logging.getLogger("fairgpu.scheduler")

LEASE_ROW_ID = 1
# pg_try_advisory_lock key: "fg-sched" as a signed bigint. It must differ from the migration
# lock's key (scheduler.db.migrate), or a leader blocks every migration, bootstrap included.
LEASE_LOCK_KEY = int.from_bytes(b"fg-sched", "big", signed=True)


class LeaseLost(Exception):
    """The epoch moved on: another replica leads now. Nothing of this cycle may be applied."""


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def _bump_epoch(session: AsyncSession, holder: str, now: datetime, ttl_s: float) -> int:
    row = await session.get(SchedulerLease, LEASE_ROW_ID, with_for_update=True)
    expires = now + timedelta(seconds=ttl_s)
    if row is None:
        row = SchedulerLease(
            id=LEASE_ROW_ID,
            holder=holder,
            epoch=1,
            acquired_at=now,
            renewed_at=now,
            expires_at=expires,
        )
        session.add(row)
    else:
        row.holder = holder
        row.epoch += 1
        row.acquired_at = now
        row.renewed_at = now
        row.expires_at = expires
    await session.flush()
    return row.epoch


async def check_fence(session: AsyncSession, epoch: int, *, now: datetime, ttl_s: float) -> None:
    """First statement of every apply: lock the lease row, check the epoch, renew the lease.

    Being an UPDATE-first transaction also matters on SQLite: the write lock is taken before
    anything is read, so the transaction can never need to upgrade a stale read snapshot.
    """
    if session.get_bind().dialect.name == "postgresql":
        current = await session.scalar(
            select(SchedulerLease.epoch).where(SchedulerLease.id == LEASE_ROW_ID).with_for_update()
        )
        if current != epoch:
            raise LeaseLost(f"lease epoch is {current}, this replica holds {epoch}")
    result = await session.execute(
        update(SchedulerLease)
        .where(SchedulerLease.id == LEASE_ROW_ID, SchedulerLease.epoch == epoch)
        .values(renewed_at=now, expires_at=now + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise LeaseLost(f"lease epoch moved on from {epoch}")


# A new leader waits this long for the lease row before ending the deposed leader's session.
ROW_WAIT_MS = 1000
LOCK_NOT_AVAILABLE = "55P03"


class Lease:
    """Acquire, hold and check the lease; `epoch` is what apply transactions fence on."""

    def __init__(self, engine: AsyncEngine, *, ttl_s: float) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self.holder = holder_name()
        self.epoch: int | None = None
        self._conn: AsyncConnection | None = None
        self.is_postgres = engine.dialect.name == "postgresql"
        # The lock connection serves one statement at a time: the cycle loop's checks and a
        # readiness probe's (`still_held`) may come at once.
        self._conn_lock = asyncio.Lock()

    @property
    def held(self) -> bool:
        return self.epoch is not None

    async def try_acquire(self, session: AsyncSession) -> bool:
        """One attempt; True when this replica now leads (with a fresh epoch)."""
        try:
            if self.is_postgres:
                return await self._try_acquire_postgres(session)
            return await self._try_acquire_row(session)
        except Exception:
            await self.release()  # a broken lock connection must not be reused
            raise

    async def _try_acquire_row(self, session: AsyncSession) -> bool:
        now = utcnow()
        async with session.begin():
            row = await session.get(SchedulerLease, LEASE_ROW_ID)
            if row is not None and row.holder != self.holder and row.expires_at > now:
                return False
            self.epoch = await _bump_epoch(session, self.holder, now, self.ttl_s)
        log.info("scheduler lease taken (epoch %s)", self.epoch)
        return True

    async def _try_acquire_postgres(self, session: AsyncSession) -> bool:
        if self._conn is None:
            self._conn = await self.engine.connect()
            # Bound how long a holder that vanished without closing its socket keeps the lock.
            keepalive_s = max(1, int(self.ttl_s / 3))
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval"):
                await self._conn.execute(text(f"SET {name} = {keepalive_s}"))
            await self._conn.execute(text("SET tcp_keepalives_count = 2"))
            await self._conn.commit()
        got = await self._conn.scalar(
            text("SELECT pg_try_advisory_lock(:k)"), {"k": LEASE_LOCK_KEY}
        )
        await self._conn.commit()
        if not got:
            return False
        while True:
            try:
                async with session.begin():
                    await session.execute(text(f"SET LOCAL lock_timeout = '{ROW_WAIT_MS}ms'"))
                    self.epoch = await _bump_epoch(session, self.holder, utcnow(), self.ttl_s)
                break
            except DBAPIError as exc:
                if sqlstate(exc) != LOCK_NOT_AVAILABLE:
                    raise
                await self._end_deposed_transactions()
        log.info("scheduler lease taken (epoch %s)", self.epoch)
        return True

    async def _end_deposed_transactions(self) -> None:
        """We hold the lock, so whoever holds the lease row is a leader that lost it: frozen
        in the middle of an apply, its session neither idle (the database would end it after
        `idle_in_transaction_session_timeout`) nor gone. Its transaction would fail the epoch
        check anyway; end it so that we can lead now. Only in this database: the table's oid
        may also be another database's lease table on the same server (one made from this one
        as a template), whose own leader is not ours to end."""
        assert self._conn is not None
        ended = await self._conn.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
                "WHERE relation = 'scheduler_lease'::regclass AND granted "
                "AND pid <> pg_backend_pid() "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )
        await self._conn.commit()
        log.warning("scheduler lease row held by a deposed leader: ended %s session(s)", ended)

    async def still_held(self) -> bool:
        """Is the lock connection alive? (On SQLite, the fence check in apply is the test.)"""
        if not self.is_postgres or self.epoch is None:
            return self.epoch is not None
        async with self._conn_lock:
            if self._conn is None:
                return False
            try:
                await self._conn.scalar(text("SELECT 1"))
                await self._conn.commit()
                return True
            except Exception:  # the connection is gone, and with it the lock
                log.warning("scheduler lease connection lost", exc_info=True)
        await self.release()
        return False

    async def release(self) -> None:
        """Give the lease up: unlock and close the connection (the lock dies with it anyway)."""
        self.epoch = None
        async with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute(text("SELECT pg_advisory_unlock_all()"))
            await conn.commit()
        except Exception:  # already broken: closing is all that is left
            log.debug("unlock on a broken lease connection", exc_info=True)
        try:
            await conn.close()
        except Exception:
            log.debug("closing the lease connection failed", exc_info=True)

    async def give_up_row(self, session: AsyncSession) -> None:
        """On a clean stop with SQLite: expire the row so a restart takes over at once."""
        if self.is_postgres or self.epoch is None:
            return
        async with session.begin():
            row = await session.get(SchedulerLease, LEASE_ROW_ID)
            if row is not None and row.holder == self.holder:
                row.expires_at = utcnow()
        self.epoch = None
