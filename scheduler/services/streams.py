"""Terminal streams waiting for their node's agent, in this server process (docs/INTERACTIVE.md).

A user's `attach` registers a stream here and wakes the node's long-poll; the heartbeat reply
then carries it (`HeartbeatReply.streams`) until the agent opens `WS /v1/agent/streams/{id}`,
which claims it and hands its WebSocket to the waiting user side. A stream is claimed once, by
the node it is for, and expires unclaimed after `ttl_s`. In memory: one server process holds
both sides of a stream.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from protocol.agent import MAX_TASKS_PER_HEARTBEAT, StreamOpen

StreamKind = Literal["attach", "port"]


@dataclass(eq=False)
class PendingStream:
    """One user side waiting for (then relaying to) the agent's side."""

    id: str
    job_id: int
    task_id: int
    node_id: int
    kind: StreamKind
    expires_at: float
    """time.monotonic() after which an unclaimed stream is dropped."""
    requested_at: float = field(default_factory=time.monotonic)
    port: int | None = None
    """The task's TCP port, for a "port" stream (`fairgpu port-forward`)."""
    agent: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """The agent's WebSocket, once it has connected."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the relay has ended: the agent's endpoint returns (and closes) then."""

    def open_message(self) -> StreamOpen:
        return StreamOpen(id=self.id, task_id=self.task_id, kind=self.kind, port=self.port)


class StreamHub:
    """Kept on `app.state.streams`; the heartbeat reads it (`for_node`) on every reply."""

    def __init__(self, *, ttl_s: float = 15.0) -> None:
        self.ttl_s = ttl_s
        self._pending: dict[str, PendingStream] = {}
        self._by_node: dict[int, set[str]] = {}

    def request(
        self,
        *,
        job_id: int,
        task_id: int,
        node_id: int,
        kind: StreamKind,
        port: int | None = None,
    ) -> PendingStream:
        """A new stream for the node's agent to open; the caller wakes the node."""
        stream = PendingStream(
            id=secrets.token_urlsafe(24),
            job_id=job_id,
            task_id=task_id,
            node_id=node_id,
            kind=kind,
            expires_at=time.monotonic() + self.ttl_s,
            port=port,
        )
        self._pending[stream.id] = stream
        self._by_node.setdefault(node_id, set()).add(stream.id)
        return stream

    def for_node(self, node_id: int) -> list[StreamOpen]:
        """The streams the node's agent must open now (cheap when there are none)."""
        ids = self._by_node.get(node_id)
        if not ids:
            return []
        now = time.monotonic()
        expired = [i for i in ids if self._pending[i].expires_at < now]
        self._drop(expired)
        # One job's streams after another's in turn, each job's oldest first: however many
        # one tenant asks for, every job on the node is in the reply.
        by_job: dict[int, list[PendingStream]] = {}
        for stream_id in self._by_node.get(node_id, ()):
            stream = self._pending[stream_id]
            by_job.setdefault(stream.job_id, []).append(stream)
        queues = [sorted(s, key=lambda p: p.requested_at) for _, s in sorted(by_job.items())]
        fair = [q[turn] for turn in range(max(map(len, queues), default=0)) for q in queues
                if turn < len(q)]  # fmt: skip
        return [stream.open_message() for stream in fair[:MAX_TASKS_PER_HEARTBEAT]]

    def claim(self, stream_id: str, node_id: int) -> PendingStream | None:
        """The stream, taken out of the pending set, if it is pending for this node."""
        stream = self._pending.get(stream_id)
        if stream is None or stream.node_id != node_id or stream.expires_at < time.monotonic():
            return None
        self._drop([stream_id])
        return stream

    def cancel(self, stream: PendingStream) -> None:
        """The user side left before the agent came."""
        self._drop([stream.id])

    def _drop(self, ids: Iterable[str]) -> None:
        for stream_id in list(ids):
            stream = self._pending.pop(stream_id, None)
            if stream is None:
                continue
            node = self._by_node.get(stream.node_id)
            if node is not None:
                node.discard(stream_id)
                if not node:
                    del self._by_node[stream.node_id]
