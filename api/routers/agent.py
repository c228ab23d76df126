"""`/v1/agent`: the node agent protocol (register, long-poll heartbeat); see api/schemas/agent.py.

Only node agents call these. A heartbeat's reports are committed before it is held: a long-poll
never keeps a transaction (or a pooled connection) open while it waits.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import AgentPrincipal, SessionDep
from api.schemas.agent import AgentRegister, AgentRegistered, Heartbeat, HeartbeatReply
from scheduler.services import agents as svc
from scheduler.services.errors import Unauthenticated
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.scheduling.work import pending_reply
from scheduler.settings import Settings

router = APIRouter(prefix="/v1/agent", tags=["agent"])
MAX_TOKEN_CHARS = 256


def _join_token(request: Request) -> str:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or len(secret) > MAX_TOKEN_CHARS:
        raise Unauthenticated("registration needs 'Authorization: Bearer <join token>'")
    return secret


@router.post("/register", response_model=AgentRegistered)
async def register(request: Request, body: AgentRegister, session: SessionDep) -> AgentRegistered:
    """Register a node with a join token (`Authorization: Bearer <join token>`).

    Registering the same node name again returns the same `node_id` and a new credential; the
    previous credential is revoked. A bad, expired or used-up join token is 401.
    """
    settings: Settings = request.app.state.settings
    registered = await svc.register_node(
        session, join_secret=_join_token(request), body=body, settings=settings
    )
    await session.commit()
    request.app.state.auth_cache.clear()  # the node's previous credential was just revoked
    runtime: SchedulerRuntime = request.app.state.runtime
    runtime.notify("node registered")
    return registered


@router.post("/heartbeat", response_model=HeartbeatReply)
async def heartbeat(
    request: Request, body: Heartbeat, principal: AgentPrincipal, session: SessionDep
) -> HeartbeatReply:
    """GPU samples, task states and log chunks in; tasks to start and to stop out.

    With `wait_s` > 0 and nothing new to say on either side, the reply is held up to
    min(`wait_s`, the server's `heartbeat_long_poll_s`) and sent as soon as the node has work.
    """
    settings: Settings = request.app.state.settings
    runtime: SchedulerRuntime = request.app.state.runtime
    assert principal.node_id is not None
    node_id = principal.node_id
    outcome = await svc.heartbeat(session, node_id=node_id, body=body, settings=settings)
    await session.commit()
    if outcome.changed:
        runtime.notify("heartbeat")
    if outcome.wake_nodes:
        runtime.wake_nodes(outcome.wake_nodes)
    reply = outcome.reply
    wait_s = min(body.wait_s, settings.heartbeat_long_poll_s)
    if wait_s <= 0 or outcome.urgent or reply.start or reply.stop:
        return reply

    async def check() -> HeartbeatReply | None:
        try:
            return await pending_reply(session, node_id=node_id, settings=settings)
        finally:
            await session.rollback()  # end the read: nothing stays open while we wait

    held = await runtime.hold(node_id, wait_s, check)
    return held if held is not None else reply
