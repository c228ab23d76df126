"""Wake-ups between server processes, over PostgreSQL LISTEN/NOTIFY.

A submission, a cancel or a drain may arrive at any server process, but only the process
holding the scheduler lease runs cycles; a cycle may start tasks on nodes whose long-polls are
held by other processes. Two channels carry the news:

- `fairgpu_cycle`: a cycle is wanted. The lease holder wakes its loop at once instead of
  waiting for its timer (`cycle_interval_s`). Each process sends at most one per
  `cycle_min_gap_s`: the leader cannot cycle faster than that anyway.
- `fairgpu_nodes`: there is work for these nodes (the payload lists their ids). Every process
  releases the long-polls it holds for them, so a started task reaches its agent in
  milliseconds rather than at the next re-check (`long_poll_recheck_s`).
- `fairgpu_streams`: an interactive stream waits for its node's agent, or no longer does (a
  small JSON payload, scheduler/services/streams.py): every process then carries it in that
  node's heartbeat replies, whichever process holds the user's side. Sent before the node
  wake-ups queued with it, so that a released long-poll finds it.

Each process keeps one connection for both (LISTEN and the NOTIFYs it sends, autocommit). A
notification from our own connection is ignored: it was acted on locally already. When the
connection drops, news may have been missed: on every (re)connection the process wakes its loop
and all its held long-polls, which re-check the database. Nothing depends on a notification
arriving; the timer and the re-checks remain the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg

log = logging.getLogger("fairgpu.scheduler")

CYCLE_CHANNEL = "fairgpu_cycle"
NODES_CHANNEL = "fairgpu_nodes"
STREAMS_CHANNEL = "fairgpu_streams"
# PostgreSQL refuses payloads of 8,000 bytes or more; node ids go out in chunks below that.
MAX_PAYLOAD_BYTES = 7_900
CONNECT_TIMEOUT_S = 10.0
MAX_QUEUED_STREAMS = 1_000


def node_payloads(node_ids: Iterable[int]) -> list[str]:
    """Comma-separated ids, split so that no payload reaches PostgreSQL's limit."""
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for node_id in sorted(set(node_ids)):
        item = str(node_id)
        if current and size + len(item) + 1 > MAX_PAYLOAD_BYTES:
            payloads.append(",".join(current))
            current, size = [], 0
        current.append(item)
        size += len(item) + 1
    if current:
        payloads.append(",".join(current))
    return payloads


def parse_node_payload(payload: str) -> list[int]:
    """The ids of a `fairgpu_nodes` payload; anything else in it is ignored."""
    return [int(part) for part in payload.split(",") if part.strip().isdigit()]


class Wakeups:
    """One process's end of the two channels: sends what it is asked to, calls back on news."""

    def __init__(
        self,
        dsn: str,
        *,
        on_cycle: Callable[[], None],
        on_nodes: Callable[[list[int]], None],
        on_reconnect: Callable[[], None],
        cycle_min_gap_s: float,
        retry_s: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.on_cycle = on_cycle
        self.on_nodes = on_nodes
        self.on_reconnect = on_reconnect
        self.cycle_min_gap_s = cycle_min_gap_s
        self.retry_s = retry_s
        self.connected = asyncio.Event()
        self.sent = 0  # notifications sent (tests, debugging)
        self._cycle_wanted = False
        self._nodes: set[int] = set()
        self._pending = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._own_pid: int | None = None
        self._lost = asyncio.Event()  # the current connection was terminated
        self._streams: list[str] = []
        self.on_streams: Callable[[str], None] | None = None
        """Called with each `fairgpu_streams` payload from another process."""

    # -- what the process asks for --------------------------------------------------------------

    def request_cycle(self) -> None:
        """Ask the lease holder, wherever it runs, for a cycle (coalesced, never blocks)."""
        self._cycle_wanted = True
        self._pending.set()

    def wake_nodes(self, node_ids: Iterable[int]) -> None:
        """Tell every process to release its long-polls for these nodes (coalesced)."""
        before = len(self._nodes)
        self._nodes.update(node_ids)
        if len(self._nodes) != before:
            self._pending.set()

    def announce_stream(self, payload: str) -> None:
        """Tell every other process about a stream (services/streams.py; in order, never
        blocks)."""
        self._streams.append(payload)
        # While the connection is down the others resync from the rows when theirs returns;
        # what is queued here only has to be bounded.
        del self._streams[:-MAX_QUEUED_STREAMS]
        self._pending.set()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="fairgpu-wakeups")

    async def stop(self) -> None:
        self._stopping = True
        self._pending.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected.clear()

    # -- the connection ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            conn: Any = None
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    timeout=CONNECT_TIMEOUT_S,
                    server_settings={"application_name": "fairgpu-wakeups"},
                )
                lost = self._lost = asyncio.Event()
                conn.add_termination_listener(self._terminated)
                self._own_pid = conn.get_server_pid()
                await conn.add_listener(CYCLE_CHANNEL, self._heard)
                await conn.add_listener(NODES_CHANNEL, self._heard)
                await conn.add_listener(STREAMS_CHANNEL, self._heard)
                self.connected.set()
                # Whatever was sent while we were not listening is lost: look again.
                self.on_reconnect()
                await self._send_loop(conn, lost)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if not self._stopping:
                    log.warning("wake-up channel unavailable, retrying: %s", exc)
            finally:
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            if not self._stopping:
                await asyncio.sleep(self.retry_s)

    async def _send_loop(self, conn: Any, lost: asyncio.Event) -> None:
        next_cycle_at = 0.0
        while not self._stopping and not lost.is_set():
            timeout: float | None = None  # nothing to send: wait for a request
            if self._nodes or self._streams:
                timeout = 0.0
            elif self._cycle_wanted:
                timeout = max(0.0, next_cycle_at - time.monotonic())
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pending.wait(), timeout)
            self._pending.clear()
            if self._stopping or lost.is_set():
                return
            while self._streams:
                await conn.execute("SELECT pg_notify($1, $2)", STREAMS_CHANNEL, self._streams[0])
                self._streams.pop(0)
                self.sent += 1
            if self._nodes:
                nodes, self._nodes = self._nodes, set()
                try:
                    for payload in node_payloads(nodes):
                        await conn.execute("SELECT pg_notify($1, $2)", NODES_CHANNEL, payload)
                        self.sent += 1
                except BaseException:
                    self._nodes |= nodes  # sent again after reconnecting
                    raise
            if self._cycle_wanted and time.monotonic() >= next_cycle_at:
                self._cycle_wanted = False
                try:
                    await conn.execute("SELECT pg_notify($1, '')", CYCLE_CHANNEL)
                    self.sent += 1
                except BaseException:
                    self._cycle_wanted = True
                    raise
                next_cycle_at = time.monotonic() + self.cycle_min_gap_s

    def _terminated(self, _conn: Any) -> None:
        self._lost.set()
        self._pending.set()

    def _heard(self, _conn: Any, pid: int, channel: str, payload: str) -> None:
        if pid == self._own_pid:
            return  # acted on locally when it was sent
        if channel == CYCLE_CHANNEL:
            self.on_cycle()
        elif channel == NODES_CHANNEL:
            self.on_nodes(parse_node_payload(payload))
        elif channel == STREAMS_CHANNEL and self.on_streams is not None:
            self.on_streams(payload)
