"""Interactive streams waiting for their node's agent, and the user sides this process holds
(docs/INTERACTIVE.md).

A user's `attach` or forwarded connection opens a stream row (services/streamrows.py) naming
this process as its holder, and publishes the stream: every heartbeat reply to its node, from
whichever process answers it, carries it (`HeartbeatReply.streams`) until the agent opens
`WS /v1/agent/streams/{id}` on some process, which claims the row (once, only the node it is
for, before it expires). Each process keeps the waiting streams of every process in memory, so
that a heartbeat reply costs no query: its own, and on PostgreSQL those it hears of through
NOTIFY (`fairgpu_streams`), reloaded from the rows whenever the channel (re)connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol.agent import MAX_TASKS_PER_HEARTBEAT, StreamOpen
from scheduler.db.engine import run_to_end
from scheduler.db.types import utcnow
from scheduler.services import forwarding, streamrows
from scheduler.services.interactive import AttachTarget
from scheduler.services.streamrows import (
    ALIVE_REFRESH_S,
    Claimed,
    StreamCaps,
    StreamKind,
    StreamOwner,
)

log = logging.getLogger(__name__)

__all__ = ["Claim", "PendingStream", "StreamHub", "StreamKind"]
T = TypeVar("T")


@dataclass(eq=False)
class PendingStream:
    """One user side held by this process, waiting for (then relaying to) the agent's side."""

    id: str
    job_id: int
    task_id: int
    node_id: int
    kind: StreamKind
    expires_at: float
    """time.monotonic() after which an unclaimed stream is no longer handed out."""
    requested_at: float = field(default_factory=time.monotonic)
    port: int | None = None
    """The task's TCP port, for a "port" stream (`fairgpu port-forward`)."""
    agent: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """The agent's side (its WebSocket, or another process's relay hop), once connected."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the relay has ended: the agent's endpoint returns (and closes) then."""
    event_id: int | None = None
    """The forward session's event that counts this connection at its end (services/
    forwarding.py); None: nothing to count."""
    bytes_to_job: int = 0
    bytes_from_job: int = 0

    def open_message(self) -> StreamOpen:
        return StreamOpen(id=self.id, task_id=self.task_id, kind=self.kind, port=self.port)


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A stream, of whichever process, that its node's agent has not opened yet."""

    opened: StreamOpen
    job_id: int
    expires_at: float
    """time.monotonic() after which it is no longer handed out; all expire `ttl_s` after
    their request, so this orders them by request too."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A stream its node's agent has just claimed here: held by this process (`local`) or by
    the process at `holder_url`, which expects `relay_secret` on its relay route."""

    stream_id: str
    holder_id: str
    holder_url: str
    relay_secret: str
    local: PendingStream | None
    kind: str = "attach"


class StreamHub:
    """Kept on `app.state.streams`; the heartbeat reads it (`for_node`) on every reply."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        relay_url: str | None = None,
        ttl_s: float = 15.0,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.ttl_s = ttl_s
        self.holder_id = secrets.token_hex(16)
        """This process, as the rows name it (a restarted process is another holder)."""
        self.relay_url = relay_url
        """Where other processes reach this one's relay route (None: not known yet)."""
        self.announce: Callable[[str], None] | None = None
        """Tells the other processes (PostgreSQL NOTIFY); None: this process is alone."""
        self._local: dict[str, PendingStream] = {}
        self._waiting: dict[int, dict[str, _Waiting]] = {}
        self._handed: set[str] = set()
        """Waiting streams a reply of this process has carried: news no more (`has_news`)."""
        self._keeper: asyncio.Task[None] | None = None

    # -- the user's side ------------------------------------------------------------------------

    async def open(
        self,
        session: AsyncSession,
        target: AttachTarget,
        kind: StreamKind,
        *,
        owner: StreamOwner,
        caps: StreamCaps,
        holder_url: str,
        port: int | None = None,
    ) -> PendingStream:
        """A new stream's row, in the caller's transaction (429 past the job's cap or one of
        `caps`, counted over every process); once committed, `publish` it."""
        stream = PendingStream(
            id=secrets.token_urlsafe(24),
            job_id=target.job_id,
            task_id=target.task_id,
            node_id=target.node_id,
            kind=kind,
            expires_at=time.monotonic() + self.ttl_s,
            port=port,
        )
        await streamrows.open_row(
            session,
            stream_id=stream.id,
            target=target,
            kind=kind,
            port=port,
            owner=owner,
            caps=caps,
            holder_id=self.holder_id,
            holder_url=holder_url,
            now=utcnow(),
            ttl_s=self.ttl_s,
        )
        return stream

    def publish(self, stream: PendingStream) -> None:
        """The committed stream goes out in its node's heartbeat replies, from every process;
        the caller wakes the node's long-polls."""
        self._local[stream.id] = stream
        opened = stream.open_message()
        self._note(stream.node_id, _Waiting(opened, stream.job_id, stream.expires_at))
        news = {"op": "open", "node": stream.node_id, "job": stream.job_id}
        self._tell({**news, **opened.model_dump()})

    def local(self, stream_id: str) -> PendingStream | None:
        return self._local.get(stream_id)

    async def end(self, stream: PendingStream) -> None:
        """The stream is over (or its agent never came): its row goes."""
        self._local.pop(stream.id, None)
        self._forget(stream.node_id, stream.id)
        self._tell({"op": "gone", "node": stream.node_id, "id": stream.id})

        async def end(session: AsyncSession) -> None:
            await streamrows.end_rows(session, [stream.id])
            if stream.event_id is not None:  # in the same transaction: no write of its own
                await forwarding.count_connection(
                    session,
                    event_id=stream.event_id,
                    bytes_to_job=stream.bytes_to_job,
                    bytes_from_job=stream.bytes_from_job,
                )

        try:
            await self._write(end)
        except Exception:  # swept once its holder stops keeping it alive
            log.exception("stream %s: its row could not be deleted", stream.id[:8])

    # -- the agent's side -----------------------------------------------------------------------

    def has_news(self, node_id: int) -> bool:
        """Whether the node has a waiting stream that no reply of this process has carried yet:
        only such a stream ends a held heartbeat. One already carried is on its agent's way to
        being claimed, so the agent can poll again at once without the reply coming straight
        back (and one other tenant's next stream still reaches it at once)."""
        waiting = self._live(node_id)
        return any(stream_id not in self._handed for stream_id in waiting)

    def for_node(self, node_id: int) -> list[StreamOpen]:
        """The streams the node's agent must open now (cheap when there are none)."""
        waiting = self._live(node_id)
        if not waiting:
            return []
        # One job's streams after another's in turn, each job's oldest first: however many
        # one tenant asks for, every job on the node is in the reply.
        by_job: dict[int, list[_Waiting]] = {}
        for entry in waiting.values():
            by_job.setdefault(entry.job_id, []).append(entry)
        queues = [sorted(q, key=lambda e: e.expires_at) for _, q in sorted(by_job.items())]
        fair = [q[turn] for turn in range(max(map(len, queues), default=0)) for q in queues
                if turn < len(q)]  # fmt: skip
        opened = [entry.opened for entry in fair[:MAX_TASKS_PER_HEARTBEAT]]
        self._handed.update(o.id for o in opened)
        return opened

    def _live(self, node_id: int) -> dict[str, _Waiting]:
        """The node's waiting streams, less those expired (forgotten here)."""
        waiting = self._waiting.get(node_id)
        if not waiting:
            return {}
        now = time.monotonic()
        for stream_id in [i for i, entry in waiting.items() if entry.expires_at < now]:
            self._forget(node_id, stream_id)
        return self._waiting.get(node_id, {})

    async def claim(self, stream_id: str, node_id: int) -> Claim | None:
        """The stream, claimed for good, if it is pending for this node (None otherwise)."""
        relay_secret = secrets.token_urlsafe(32)

        async def claim(session: AsyncSession) -> Claimed | None:
            return await streamrows.claim_row(
                session,
                stream_id=stream_id,
                node_id=node_id,
                relay_secret=relay_secret,
                now=utcnow(),
            )

        claimed = await self._write(claim)
        self._forget(node_id, stream_id)
        if claimed is None:
            return None
        self._tell({"op": "gone", "node": node_id, "id": stream_id})
        mine = claimed.holder_id == self.holder_id
        return Claim(
            stream_id=stream_id,
            holder_id=claimed.holder_id,
            holder_url=claimed.holder_url,
            relay_secret=relay_secret,
            local=self._local.get(stream_id) if mine else None,
            kind=claimed.kind,
        )

    async def relay_secret_ok(self, stream_id: str, secret: str) -> bool:
        """Whether another process's relay hop for a stream held here is the claimer's."""
        async with self.sessionmaker() as session:
            ok = await streamrows.relay_secret_ok(
                session, stream_id=stream_id, holder_id=self.holder_id, secret=secret
            )
            await session.rollback()
        return ok

    # -- news from the other processes ---------------------------------------------------------

    def heard(self, payload: str) -> list[int]:
        """A `fairgpu_streams` notification; the nodes whose long-polls have news."""
        try:
            news = json.loads(payload)
            node_id = int(news["node"])
            if news.get("op") == "gone":
                self._forget(node_id, str(news["id"]))
                return []
            opened = StreamOpen.model_validate(
                {k: news[k] for k in ("id", "task_id", "kind", "port") if k in news}
            )
            job_id = int(news["job"])
        except (ValueError, KeyError, TypeError, ValidationError):
            log.warning("ignored a malformed stream notification")
            return []
        self._note(node_id, _Waiting(opened, job_id, time.monotonic() + self.ttl_s))
        return [node_id]

    async def resync(self) -> list[int]:
        """The waiting streams as the rows say (news may have been missed); their nodes."""
        waiting: dict[int, dict[str, _Waiting]] = {}
        async with self.sessionmaker() as session:
            now = utcnow()
            clock = time.monotonic()
            # Read inside the session: its rollback expires the rows, which then cannot load.
            for row in await streamrows.pending_rows(session, now=now):
                kind: StreamKind = "port" if row.kind == "port" else "attach"
                if row.kind == "new":
                    kind = "new"
                opened = StreamOpen(id=row.id, task_id=row.task_id, kind=kind, port=row.port)
                expires = clock + (row.expires_at - now).total_seconds()
                entry = _Waiting(opened, row.job_id, expires)
                waiting.setdefault(row.node_id, {})[row.id] = entry
            await session.rollback()
        self._waiting = waiting
        # What the rows no longer hold is forgotten here too, not kept for ever.
        self._handed &= {stream_id for node in waiting.values() for stream_id in node}
        return list(waiting)

    # -- keeping rows alive -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_alive(), name="fairgpu-streams")

    async def stop(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_REFRESH_S)
            try:
                await self._write(
                    lambda session: streamrows.keep_alive(
                        session, holder_id=self.holder_id, now=utcnow()
                    )
                )
            except Exception:  # the next round tries again
                log.exception("stream rows could not be kept alive")

    # -- internals ------------------------------------------------------------------------------

    async def _write(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async def transaction() -> T:
            async with self.sessionmaker() as session:
                result = await work(session)
                await session.commit()
            return result

        return await run_to_end(transaction())  # a write ends even if the caller is cancelled

    def _tell(self, news: dict[str, Any]) -> None:
        if self.announce is not None:
            self.announce(json.dumps(news, separators=(",", ":")))

    def _note(self, node_id: int, entry: _Waiting) -> None:
        self._waiting.setdefault(node_id, {})[entry.opened.id] = entry

    def _forget(self, node_id: int, stream_id: str) -> None:
        self._handed.discard(stream_id)
        waiting = self._waiting.get(node_id)
        if waiting is not None:
            waiting.pop(stream_id, None)
            if not waiting:
                del self._waiting[node_id]
