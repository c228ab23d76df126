"""The long-poll: a heartbeat with nothing to carry is held until the node has work.

A heartbeat's reports are committed before it is held: a long-poll never keeps a transaction
(or a pooled connection) open while it waits. Each check is a short read in a session of its
own, and the hold ends with 401 once the credential is revoked (`node revoke` wakes it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from protocol.agent import HeartbeatReply
from scheduler.db.types import utcnow
from scheduler.services.errors import Unauthenticated
from scheduler.services.scheduling import work
from scheduler.services.streams import StreamHub
from scheduler.services.tokens import credential_live
from scheduler.settings import Settings

if TYPE_CHECKING:
    from scheduler.services.runtime import SchedulerRuntime


async def hold(
    runtime: SchedulerRuntime,
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    node_id: int,
    credential_hash: str,
    wait_s: float,
    reply: HeartbeatReply,
    streams: StreamHub | None = None,
) -> HeartbeatReply:
    """`reply`, or a reply with work for the node as soon as it has some, within `wait_s`.
    Work includes a stream to open that no reply of this process has carried yet (`streams`)."""

    async def check() -> HeartbeatReply | None:
        async with sessionmaker() as session:
            if not await credential_live(session, credential_hash, utcnow()):
                raise Unauthenticated("this node's credential was revoked")
            found = await work.pending_reply(session, node_id=node_id, settings=settings)
        if streams is not None and (found is not None or streams.has_news(node_id)):
            opened = streams.for_node(node_id)
            if opened:
                found = (found or reply).model_copy(update={"streams": opened})
        return found

    held = await runtime.hold(node_id, wait_s, check)
    return held if held is not None else reply
