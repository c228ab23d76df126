"""`/v1/agent`: the node agent protocol (register, long-poll heartbeat); see api/schemas/agent.py.

Only node agents call these. A heartbeat's reports are committed before it is held: a long-poll
never keeps a transaction (or a pooled connection) open while it waits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.deps import AutocommitAgentPrincipal, AutocommitSessionDep, SessionDep, parse_bearer
from protocol.agent import AgentRegister, AgentRegistered, Heartbeat, HeartbeatReply
from scheduler.db.engine import run_to_end
from scheduler.db.types import utcnow
from scheduler.services import agents as svc
from scheduler.services.errors import Unauthenticated
from scheduler.services.livebuffer import LiveBuffer
from scheduler.services.quickbeat import Quick, quick_heartbeat
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.scheduling import work
from scheduler.services.tokens import credential_live, hash_token
from scheduler.settings import Settings

router = APIRouter(prefix="/v1/agent", tags=["agent"])


def _join_token(request: Request) -> str:
    secret = parse_bearer(request.headers.get("authorization", ""))
    if secret is None:
        raise Unauthenticated("registration needs 'Authorization: Bearer <join token>'")
    return secret


@router.post("/register", response_model=AgentRegistered)
async def register(request: Request, body: AgentRegister, session: SessionDep) -> AgentRegistered:
    """Register a new node with a join token (`Authorization: Bearer <join token>`).

    An existing node re-registers with its current credential as the bearer (same `node_id`, a
    new credential; the previous one is revoked). A join token for an existing node's name is
    409, unless a platform admin approved the takeover (`POST /v1/nodes/{id}/approve`). A bad,
    expired or used-up token is 401.
    """
    settings: Settings = request.app.state.settings
    registered = await svc.register_node(
        session, join_secret=_join_token(request), body=body, settings=settings
    )
    await session.commit()
    request.app.state.auth_cache.clear()  # the node's previous credential was just revoked
    runtime: SchedulerRuntime = request.app.state.runtime
    live: LiveBuffer | None = getattr(runtime, "live", None)
    if live is not None:
        live.forget(registered.node_id)  # its GPUs may have changed
    runtime.notify("node registered")
    return registered


@router.post("/heartbeat", response_model=HeartbeatReply)
async def heartbeat(
    request: Request,
    body: Heartbeat,
    principal: AutocommitAgentPrincipal,
    quick: AutocommitSessionDep,
) -> Response:
    """GPU samples, task states and log chunks in; tasks to start and to stop out.

    With `wait_s` > 0 and nothing new to say on either side, the reply is held up to
    min(`wait_s`, the server's `heartbeat_long_poll_s`) and sent as soon as the node has work.
    A heartbeat that changes nothing is answered after one read; its liveness and samples reach
    the database within `heartbeat_flush_interval_s` (scheduler/services/livebuffer.py).
    """
    settings: Settings = request.app.state.settings
    runtime: SchedulerRuntime = request.app.state.runtime
    assert principal.node_id is not None
    node_id = principal.node_id
    now = utcnow()
    credential = hash_token(parse_bearer(request.headers.get("authorization", "")) or "")
    renew = needs_renewal(principal.expires_at, now, settings)
    live: LiveBuffer | None = getattr(runtime, "live", None)
    # The hot path (api/hot.py) has already read the node and found it needs the full path.
    tried = getattr(request.state, "hot_path_tried", False)
    if live is not None and settings.heartbeat_flush_interval_s > 0 and not tried and not renew:
        conn = await quick.connection()
        done = await quick_heartbeat(conn, node_id=node_id, body=body, buffer=live, now=now)
        await quick.rollback()  # ends the read (a no-op on an autocommit connection)
        if done is Quick.UNKNOWN_NODE:
            raise Unauthenticated("this node is no longer registered")
        if done is Quick.DONE:
            wait_s = min(body.wait_s, settings.heartbeat_long_poll_s)
            reply = work.reply(settings, now)
            if wait_s > 0:
                reply = await hold_heartbeat(request.app.state, node_id, credential, wait_s, reply)
            return _json(reply)
    maker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    buffered = live.take_node(node_id) if live is not None else []
    if buffered:  # counted before this heartbeat's reports may end their allocations
        body = body.model_copy(update={"samples": [*buffered, *body.samples]})

    async def apply() -> svc.HeartbeatOutcome:
        async with maker() as session:
            outcome = await svc.heartbeat(
                session,
                node_id=node_id,
                body=body,
                settings=settings,
                renew_token_id=principal.token_id if renew else None,
            )
            await session.commit()
        # Committed: what it changed is news even when the request has been cancelled.
        if live is not None and outcome.gpus is not None:
            live.learn(node_id, outcome.gpus)
        if outcome.changed:
            runtime.notify("heartbeat")
        if outcome.wake_nodes:
            runtime.wake_nodes(outcome.wake_nodes)
        return outcome

    try:
        outcome = await run_to_end(apply())
    except BaseException:
        if live is not None and buffered:
            live.put_back_node(node_id, buffered)
        raise
    reply = outcome.reply
    wait_s = min(body.wait_s, settings.heartbeat_long_poll_s)
    if wait_s <= 0 or outcome.urgent or reply.start or reply.stop:
        return _json(reply)
    return _json(await hold_heartbeat(request.app.state, node_id, credential, wait_s, reply))


def needs_renewal(expires_at: datetime | None, now: datetime, settings: Settings) -> bool:
    """Less than half of the credential's lifetime is left: the reply carries a new one."""
    if expires_at is None:
        return False
    return (expires_at - now).total_seconds() < settings.node_credential_ttl_s / 2


async def hold_heartbeat(
    state: Any, node_id: int, credential_hash: str, wait_s: float, reply: HeartbeatReply
) -> HeartbeatReply:
    """Hold the long-poll (`state` is the app's); each check is a short read in a session of
    its own, and ends the hold with 401 once the credential is revoked (`node revoke` wakes
    it)."""
    settings: Settings = state.settings
    runtime: SchedulerRuntime = state.runtime
    maker: async_sessionmaker[AsyncSession] = state.sessionmaker

    async def check() -> HeartbeatReply | None:
        async with maker() as session:
            if not await credential_live(session, credential_hash, utcnow()):
                raise Unauthenticated("this node's credential was revoked")
            return await work.pending_reply(session, node_id=node_id, settings=settings)

    held = await runtime.hold(node_id, wait_s, check)
    return held if held is not None else reply


def _json(reply: HeartbeatReply) -> Response:
    return Response(work.reply_json(reply), media_type="application/json")
