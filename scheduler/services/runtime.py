"""The scheduler inside a server process: lease, cycle loop, and long-poll wake-ups.

Every replica runs a `SchedulerRuntime`. The one holding the lease runs cycles: on `notify`
(a submit, a finished task, a heartbeat that changed something) and at least every
`cycle_interval_s`. Cycles are never closer together than `cycle_min_gap_s`, so a burst of events
costs one cycle, nor closer than four times the last cycle's duration (start to start), so the
scheduler never takes more than a quarter of the process from the requests it serves. The
others keep trying to take the lease.

Every replica serves long-polls: a held heartbeat waits on its node's event, set by `wake_nodes`
(an apply or a cancel); with several replicas a held heartbeat also re-checks the database every
`long_poll_recheck_s`, since the news may have been written by another one.

On PostgreSQL the processes tell each other (scheduler/services/wakeups.py): `notify` in a
process that does not hold the lease asks the holder for a cycle, and `wake_nodes` releases the
long-polls every process holds for those nodes. A process with `run_scheduler` off never takes
the lease: `fairgpu server --workers N` runs its cycles in a scheduler process of its own, so a
cycle's CPU never stalls the requests of an HTTP worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from scheduler.core import Scheduler
from scheduler.db.engine import asyncpg_dsn
from scheduler.db.types import utcnow
from scheduler.metrics import SchedulerMetrics
from scheduler.services.accounting import bucket_start
from scheduler.services.auditretention import AuditRetention
from scheduler.services.heartbeat.buffer import FlushResult, HeartbeatBuffer
from scheduler.services.jobpurge import JobPurge
from scheduler.services.jobretention import JobRetention
from scheduler.services.logretention import LogRetention
from scheduler.services.scheduling import CycleResult, Lease, LeaseLost, run_cycle
from scheduler.services.streams import StreamHub
from scheduler.services.wakeups import Wakeups
from scheduler.settings import Settings

log = logging.getLogger("fairgpu.scheduler")

# The leader also serves requests: under a stream of submissions, a cycle that took d seconds
# is followed by at least 3·d without one (cycles at most a quarter of the process).
MAX_CYCLE_SHARE = 0.25
# How often the leader deletes expired log chunks and job details (scheduler/services/
# logretention.py, jobretention.py).
LOG_RETENTION_INTERVAL_S = 60.0
T = TypeVar("T")


class SchedulerRuntime:
    def __init__(
        self,
        *,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        engine: AsyncEngine,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.engine = engine
        self.metrics = SchedulerMetrics()
        self.lease = Lease(engine, ttl_s=settings.lease_timeout_s)
        self.last_cycle_at: datetime | None = None
        self.last_cycle_error: str | None = None
        self.last_result: CycleResult | None = None
        self.cycles = 0
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._node_events: dict[int, asyncio.Event] = {}
        self._previously_open: frozenset[int] | None = None
        # Kept across cycles: its node layout is rebuilt only when a node changed.
        self.scheduler = Scheduler()
        self._cycle_done = asyncio.Condition()
        self._in_cycle = False
        self._explained_at = float("-inf")
        self.log_retention = LogRetention(settings.task_log_retention_s)
        self.job_retention = JobRetention(settings.job_detail_retention_s)
        self.job_purge = JobPurge(settings.job_purge_after_s)
        self.audit_retention = AuditRetention(settings.audit_retention_s)
        self.logs_expired_at = float("-inf")  # monotonic time of the last retention pass
        self._last_duration_s = 0.0
        self._settled_until: datetime | None = None  # open allocations in the ledger up to here
        self.live = (
            HeartbeatBuffer()
        )  # liveness and samples of quiet heartbeats, flushed in batches
        self._flusher: asyncio.Task[None] | None = None
        self.wakeups: Wakeups | None = None
        self._streams: StreamHub | None = None
        self._resyncs: set[asyncio.Task[None]] = set()
        if self.lease.is_postgres:
            self.wakeups = Wakeups(
                asyncpg_dsn(settings.database_url),
                on_cycle=self._heard_cycle,
                on_nodes=self._wake_local,
                on_reconnect=self._reconnected,
                cycle_min_gap_s=settings.cycle_min_gap_s,
            )

    # -- the contract ------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.lease.held

    async def confirm_leader(self) -> bool:
        """Leadership as the database sees it now, for readiness probes: a process frozen
        while a standby took over still believes it leads until its loop checks the lease;
        this checks it at once (one round trip on the lock connection)."""
        if not self.lease.held:
            return False
        if await self.lease.still_held():
            return True
        self.metrics.leader.set(0)
        self._wake.set()  # the loop tries to take the lease again
        return False

    @property
    def multi_replica(self) -> bool:
        """Other replicas may write work for our nodes: held heartbeats must poll the database."""
        return self.lease.is_postgres

    async def start(self) -> None:
        self._stopping.clear()
        if self.wakeups is not None:
            await self.wakeups.start()
        if self._task is None and self.settings.run_scheduler:
            self._task = asyncio.create_task(self._run(), name="fairgpu-scheduler")
        if self._flusher is None and self.settings.heartbeat_flush_interval_s > 0:
            self._flusher = asyncio.create_task(self._flush_loop(), name="fairgpu-flush")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        try:
            await self.flush_heartbeats()
        except Exception:  # shutting down: the next heartbeat of each node brings it back
            log.exception("last heartbeat flush failed")
        for event in self._node_events.values():
            event.set()
        self._node_events.clear()
        if self.wakeups is not None:
            await self.wakeups.stop()
        for resync in list(self._resyncs):
            resync.cancel()
        if self.lease.held and not self.lease.is_postgres:
            with contextlib.suppress(Exception):
                async with self.sessionmaker() as session:
                    await self.lease.give_up_row(session)
        await self.lease.release()
        self.metrics.leader.set(0)

    def notify(self, reason: str) -> None:
        """Ask for a cycle soon; cheap and non-blocking, bursts coalesce into one cycle. When
        another process holds the lease, it is asked through PostgreSQL."""
        log.debug("cycle requested: %s", reason)
        self._wake.set()
        if self.wakeups is not None and not self.lease.held:
            self.wakeups.request_cycle()

    def wake_nodes(self, node_ids: Iterable[int]) -> None:
        """Release the long-polls held for these nodes, in this process and (on PostgreSQL)
        in every other server process."""
        node_ids = list(node_ids)
        if not node_ids:
            return
        self._wake_local(node_ids)
        if self.wakeups is not None:
            self.wakeups.wake_nodes(node_ids)

    def _wake_local(self, node_ids: Iterable[int]) -> None:
        for node_id in node_ids:
            event = self._node_events.pop(node_id, None)
            if event is not None:
                event.set()

    def carry_streams(self, hub: StreamHub) -> None:
        """Interactive streams waiting for a node go out in its heartbeat replies from every
        process (services/streams.py): on PostgreSQL, through the wake-up channel."""
        if self.wakeups is None:
            return
        self._streams = hub
        hub.announce = self.wakeups.announce_stream
        self.wakeups.on_streams = lambda payload: self._wake_local(hub.heard(payload))

    async def _resync_streams(self, hub: StreamHub) -> None:
        try:
            self._wake_local(await hub.resync())
        except Exception:  # the streams' own 15 s timeout bounds what is lost
            log.exception("could not reload the waiting streams")

    def _heard_cycle(self) -> None:
        if self._task is not None:  # only a process that runs cycles cares
            self._wake.set()

    def _reconnected(self) -> None:
        """The wake-up channel was down: what it carried meanwhile is lost, so the loop looks
        again and every held long-poll re-checks the database."""
        self._heard_cycle()
        self._wake_local(list(self._node_events))
        if self._streams is not None:
            resync = asyncio.create_task(self._resync_streams(self._streams))
            self._resyncs.add(resync)
            resync.add_done_callback(self._resyncs.discard)

    async def flush_heartbeats(self) -> FlushResult:
        """Write buffered liveness and samples now (the loop does it every flush interval)."""
        result = await self.live.flush(self.sessionmaker, self.settings, utcnow())
        if result.health_changed:
            self.notify("gpu health")
        return result

    async def _flush_loop(self) -> None:
        interval_s = self.settings.heartbeat_flush_interval_s
        while not self._stopping.is_set():
            await self._sleep(interval_s)
            try:
                await self.flush_heartbeats()
            except asyncio.CancelledError:
                raise
            except Exception:  # kept in the buffer; the next flush tries again
                log.exception("heartbeat flush failed")

    # -- long-poll support ---------------------------------------------------------------------

    def node_waiter(self, node_id: int) -> asyncio.Event:
        """The event `wake_nodes` sets for this node; take it *before* checking for work."""
        event = self._node_events.get(node_id)
        if event is None or event.is_set():
            event = self._node_events[node_id] = asyncio.Event()
        if self._stopping.is_set():
            event.set()
        return event

    async def hold(
        self,
        node_id: int,
        timeout_s: float,
        check: Callable[[], Awaitable[T | None]],
    ) -> T | None:
        """Long-poll: `check()` until it returns something, waking on `wake_nodes` or timer.

        With one replica only a wake-up can bring news; with several, news may be written by
        another replica, so `check` also runs every `long_poll_recheck_s`.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            event = self.node_waiter(node_id)
            found = await check()
            remaining = deadline - time.monotonic()
            if found is not None or remaining <= 0 or self._stopping.is_set():
                return found
            if self.multi_replica:
                remaining = min(remaining, self.settings.long_poll_recheck_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
            if time.monotonic() >= deadline and not event.is_set():
                return None

    async def wait_cycles(self, count: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until `count` cycles that start from now on have completed (tests, tools). The
        bound only ends a wait that would never end: a cycle took over 10 s at load 19."""
        target = self.cycles + count + (1 if self._in_cycle else 0)
        async with self._cycle_done:
            await asyncio.wait_for(
                self._cycle_done.wait_for(lambda: self.cycles >= target), timeout_s
            )

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        retry_s = min(1.0, self.settings.lease_timeout_s / 4)
        last_started = 0.0
        while not self._stopping.is_set():
            try:
                if not self.lease.held:
                    async with self.sessionmaker() as session:
                        acquired = await self.lease.try_acquire(session)
                    self.metrics.leader.set(1 if acquired else 0)
                    if not acquired:
                        await self._sleep(retry_s)
                        continue
                    self._previously_open = None
                    self._wake.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.cycle_interval_s)
                # Start to start: at least the minimum gap, and long enough that cycles take
                # at most MAX_CYCLE_SHARE of this process under a stream of events.
                min_gap_s = max(
                    self.settings.cycle_min_gap_s, self._last_duration_s / MAX_CYCLE_SHARE
                )
                gap_s = min_gap_s - (time.monotonic() - last_started)
                if gap_s > 0:
                    await self._sleep(gap_s)
                if self._stopping.is_set():
                    break
                self._wake.clear()
                last_started = time.monotonic()
                self._in_cycle = True
                try:
                    await self._cycle()
                finally:
                    self._in_cycle = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must survive a bad cycle or a database outage
                log.exception("scheduler loop error")
                self.last_cycle_error = f"{type(exc).__name__}: {exc}"
                self.metrics.cycles.labels(result="error").inc()
                await self._sleep(retry_s)

    async def _cycle(self) -> None:
        if not await self.lease.still_held():
            self.metrics.leader.set(0)
            return
        epoch = self.lease.epoch
        assert epoch is not None
        settle_until = bucket_start(utcnow())
        since_s = time.monotonic() - self._explained_at
        explain_all = since_s >= self.settings.explain_interval_s
        try:
            result = await run_cycle(
                self.sessionmaker,
                epoch=epoch,
                settings=self.settings,
                previously_open=self._previously_open,
                explain_all=explain_all,
                settle_until=settle_until if settle_until != self._settled_until else None,
                scheduler=self.scheduler,
            )
        except LeaseLost as exc:
            log.warning("scheduler lease lost: %s", exc)
            self.last_cycle_error = f"LeaseLost: {exc}"
            self.metrics.cycles.labels(result="fenced").inc()
            await self.lease.release()
            self.metrics.leader.set(0)
            self._previously_open = None
            return
        except Exception:
            self._previously_open = None
            raise
        self._previously_open = result.open_allocation_ids
        self._settled_until = settle_until
        if result.explained_all:
            self._explained_at = time.monotonic()
        self.last_result = result
        self._last_duration_s = result.duration_s
        self.last_cycle_at = result.at
        self.last_cycle_error = None
        self.metrics.observe_cycle(result)
        self.wake_nodes(result.applied.wake_nodes | result.lifecycle.wake_nodes)
        if time.monotonic() - self.logs_expired_at >= LOG_RETENTION_INTERVAL_S:
            await self.expire_logs()
            await self.expire_job_details()
            await self.purge_jobs()
            await self.expire_audit()
        async with self._cycle_done:
            self.cycles += 1
            self._cycle_done.notify_all()

    async def expire_logs(self) -> int:
        """One pass of log retention (the leader runs one every LOG_RETENTION_INTERVAL_S,
        after a cycle): deletes the expired chunks, a bounded number per pass."""
        self.logs_expired_at = time.monotonic()
        try:
            deleted = await self.log_retention.run_pass(self.sessionmaker)
        except Exception:  # the next pass retries; the cycle has already been counted
            log.exception("log retention pass failed")
            return 0
        if deleted:
            self.metrics.purged.labels(table="log_chunks").inc(deleted)
            log.info("deleted %d expired log chunks", deleted)
        return deleted

    async def expire_job_details(self) -> int:
        """One pass of job detail retention (after the log pass): deletes the events of jobs
        that ended before `job_detail_retention_s`, a bounded number per pass."""
        try:
            purged = await self.job_retention.run_pass(self.sessionmaker)
        except Exception:  # the next pass retries
            log.exception("job detail retention pass failed")
            return 0
        if purged.events or purged.jobs or purged.deleted_jobs:
            self.metrics.purged.labels(table="events").inc(purged.events)
            self.metrics.purged.labels(table="jobs").inc(purged.deleted_jobs)
            log.info(
                "purged %d events of %d or more expired jobs; deleted %d that never started",
                purged.events,
                purged.jobs,
                purged.deleted_jobs,
            )
        return purged.events

    async def purge_jobs(self) -> int:
        """One pass of the job purge (after job detail retention): jobs that ended before
        `job_purge_after_s` are rolled up into the usage rollup and deleted, a bounded number
        per pass."""
        try:
            deleted = await self.job_purge.run_pass(self.sessionmaker)
        except Exception:  # the next pass retries
            log.exception("job purge pass failed")
            return 0
        if deleted:
            self.metrics.purged.labels(table="jobs").inc(deleted)
            log.info("purged %d jobs that ended before job_purge_after_s", deleted)
        return deleted

    async def expire_audit(self) -> tuple[int, int, int]:
        """One pass of audit retention: events of no job, dead tokens and disabled users that
        own nothing, past `audit_retention_s`, a bounded number per pass; (events, tokens,
        users) deleted."""
        try:
            events, tokens, users = await self.audit_retention.run_pass(self.sessionmaker)
        except Exception:  # the next pass retries
            log.exception("audit retention pass failed")
            return 0, 0, 0
        if events or tokens or users:
            self.metrics.purged.labels(table="events").inc(events)
            self.metrics.purged.labels(table="api_tokens").inc(tokens)
            self.metrics.purged.labels(table="users").inc(users)
            log.info(
                "deleted %d old events of no job, %d dead tokens and %d disabled users",
                events,
                tokens,
                users,
            )
        return events, tokens, users

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
