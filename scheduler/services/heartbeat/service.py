"""`Heartbeats.answer`: the one entry point of a heartbeat, whichever way it arrived.

The routed heartbeat (api/routers/agent.py, after authentication) and the direct one (api/
direct.py, answered before routing on PostgreSQL) both call it. It classifies the heartbeat
(classify.py) from the node's rows (read.py); a quiet one goes to the buffer (buffer.py), any
other takes the full transactional path (full.py); either may then be held (longpoll.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol.agent import Heartbeat, HeartbeatReply
from scheduler.db.engine import run_to_end
from scheduler.db.types import utcnow
from scheduler.services.errors import Unauthenticated
from scheduler.services.heartbeat import full, longpoll
from scheduler.services.heartbeat.buffer import HeartbeatBuffer
from scheduler.services.heartbeat.classify import Verdict, body_may_be_quiet, classify
from scheduler.services.heartbeat.read import NodeTaskRow, read_node
from scheduler.services.scheduling import work
from scheduler.services.streams import StreamHub
from scheduler.settings import Settings

if TYPE_CHECKING:
    from scheduler.services.runtime import SchedulerRuntime


MAX_HELD_PER_NODE = 2


@dataclass(frozen=True, slots=True)
class Caller:
    """The agent whose credential the heartbeat carries."""

    node_id: int
    credential_hash: str
    expires_at: datetime | None
    token_id: int | None = None  # needed to renew the credential (the full path only)


def needs_renewal(expires_at: datetime | None, now: datetime, settings: Settings) -> bool:
    """Less than half of the credential's lifetime is left: the reply carries a new one."""
    return renewal_in_s(expires_at, now, settings) <= 0


def renewal_in_s(expires_at: datetime | None, now: datetime, settings: Settings) -> float:
    """Seconds until the credential needs renewing (infinite for one that never expires)."""
    if expires_at is None:
        return float("inf")
    return (expires_at - now).total_seconds() - settings.node_credential_ttl_s / 2


class Heartbeats:
    """Built once per server process (api/app.py's lifespan) and kept on `app.state`."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        read_sessionmaker: async_sessionmaker[AsyncSession],
        runtime: SchedulerRuntime,
        streams: StreamHub | None = None,
    ) -> None:
        self.settings = settings
        self.streams = streams  # terminal streams for nodes to open (services/streams.py)
        self.sessionmaker = sessionmaker
        self.read_sessionmaker = read_sessionmaker  # autocommit on PostgreSQL
        self.runtime = runtime
        # The runtime's buffer, flushed by its loop; a runtime without one (or a flush
        # interval of 0) writes every heartbeat on the full path.
        buffer: HeartbeatBuffer | None = getattr(runtime, "live", None)
        self.buffer = buffer if settings.heartbeat_flush_interval_s > 0 else None
        self._holding: dict[int, int] = {}  # node id -> its long polls held now

    def long_polls_held(self, node_id: int) -> int:
        return self._holding.get(node_id, 0)

    def forget(self, node_id: int) -> None:
        """The node registered again: its GPUs may have changed."""
        if self.buffer is not None:
            self.buffer.forget(node_id)

    async def answer(
        self,
        caller: Caller,
        body: Heartbeat,
        *,
        node: Sequence[NodeTaskRow] | None = None,
        quiet: bool = True,
        full_path: bool = True,
    ) -> HeartbeatReply | None:
        """The reply to the heartbeat. `node`: the node's rows when the caller has read them;
        `quiet=False`: go straight to the full path (the caller has classified it already);
        `full_path=False`: None instead of taking the full path."""
        settings = self.settings
        now = utcnow()
        renew = needs_renewal(caller.expires_at, now, settings)
        buffer = self.buffer
        if quiet and buffer is not None and not renew:
            known = buffer.matches(caller.node_id, body.samples)
            if body_may_be_quiet(body, gpus_as_known=known):
                if node is None:
                    node = await self._read(caller.node_id)
                verdict = classify(body, node, gpus_as_known=known)
                if verdict is Verdict.UNKNOWN_NODE:
                    raise Unauthenticated("this node is no longer registered")
                if verdict is Verdict.QUIET:
                    buffer.note(caller.node_id, now, body.samples)
                    # Held no longer than until the credential needs renewing: a hold begun
                    # just before, as long as a short lifetime's half, outlived the credential
                    # and the agent's next heartbeat was refused (401: it stopped).
                    until_s = renewal_in_s(caller.expires_at, now, settings)
                    return await self._held(caller, body, work.reply(settings, now), until_s)
        if not full_path:
            return None
        return await self._full(caller, body, renew)

    async def _read(self, node_id: int) -> list[NodeTaskRow]:
        async with self.read_sessionmaker() as session:
            rows = await read_node(await session.connection(), node_id)
            await session.rollback()  # ends the read (a no-op on an autocommit connection)
        return rows

    def _with_streams(self, node_id: int, reply: HeartbeatReply) -> HeartbeatReply:
        """`reply` with the terminal streams the node must open now, if any."""
        opened = self.streams.for_node(node_id) if self.streams is not None else []
        return reply.model_copy(update={"streams": opened}) if opened else reply

    async def _held(
        self, caller: Caller, body: Heartbeat, reply: HeartbeatReply, until_s: float
    ) -> HeartbeatReply:
        node_id = caller.node_id
        news = self.streams is not None and self.streams.has_news(node_id)
        reply = self._with_streams(node_id, reply)
        wait_s = min(body.wait_s, self.settings.heartbeat_long_poll_s, until_s)
        held = self._holding.get(node_id, 0)
        # An agent holds one long poll at a time (two across its restart); more from one
        # credential would each read the database on every wake-up of the node: answer at once.
        # Streams an earlier reply carried do not end the hold (the agent is opening them).
        if wait_s <= 0 or news or held >= MAX_HELD_PER_NODE:
            return reply
        self._holding[node_id] = held + 1
        try:
            return await longpoll.hold(
                self.runtime,
                self.sessionmaker,
                self.settings,
                node_id=node_id,
                credential_hash=caller.credential_hash,
                wait_s=wait_s,
                reply=reply,
                streams=self.streams,
            )
        finally:
            left = self._holding[node_id] - 1
            if left:
                self._holding[node_id] = left
            else:
                del self._holding[node_id]

    async def _full(self, caller: Caller, body: Heartbeat, renew: bool) -> HeartbeatReply:
        node_id = caller.node_id
        buffer = self.buffer
        buffered = buffer.take_node(node_id) if buffer is not None else []
        if buffered:  # counted before this heartbeat's reports may end their allocations
            body = body.model_copy(update={"samples": [*buffered, *body.samples]})

        committed = False

        async def apply() -> full.HeartbeatOutcome:
            nonlocal committed
            async with self.sessionmaker() as session:
                outcome = await full.heartbeat(
                    session,
                    node_id=node_id,
                    body=body,
                    settings=self.settings,
                    renew_token_id=caller.token_id if renew else None,
                )
                await session.commit()
            committed = True
            # Committed: what it changed is news even when the request has been cancelled.
            if buffer is not None and outcome.gpus is not None:
                buffer.learn(node_id, outcome.gpus)
            if outcome.changed:
                self.runtime.notify("heartbeat")
            if outcome.wake_nodes:
                self.runtime.wake_nodes(outcome.wake_nodes)
            return outcome

        try:
            # A write transaction: it ends (commit or rollback) even when the request is
            # cancelled, so SQLite's write lock is never left held (engine.run_to_end).
            outcome = await run_to_end(apply())
        except BaseException:
            # Only samples this heartbeat did not apply go back: a cancellation raised after
            # the commit (run_to_end) would otherwise have the next flush write them again.
            if buffer is not None and buffered and not committed:
                buffer.put_back_node(node_id, buffered)
            raise
        reply = outcome.reply
        if outcome.urgent or reply.start or reply.stop:
            return self._with_streams(node_id, reply)
        until_s = (
            float("inf")  # renewed: the new credential has its whole lifetime
            if reply.credential is not None
            else renewal_in_s(caller.expires_at, utcnow(), self.settings)
        )
        return await self._held(caller, body, reply, until_s)
