"""`/v1/agent`: the node agent protocol (register, long-poll heartbeat); see protocol/agent.py.

Only node agents call these. The heartbeat is answered by scheduler/services/heartbeat/.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from api.authcache import AuthCache
from api.deps import (
    AgentPrincipal,
    AutocommitAgentPrincipal,
    AutocommitSessionDep,
    SessionDep,
    parse_bearer,
)
from protocol.agent import AgentRegister, AgentRegistered, Heartbeat, HeartbeatReply, JobGpuUse
from scheduler.services import agents as svc
from scheduler.services.errors import Unauthenticated
from scheduler.services.heartbeat.service import Caller, Heartbeats
from scheduler.services.jobgpuuse import other_ranks_busy_s
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.scheduling import work
from scheduler.services.tokens import hash_token
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
    cache: AuthCache = request.app.state.auth_cache
    cache.clear()  # the node's previous credential was just revoked
    cache.vouch(hash_token(registered.credential))  # its first heartbeat is let through
    heartbeats: Heartbeats = request.app.state.heartbeats
    heartbeats.forget(registered.node_id)
    runtime: SchedulerRuntime = request.app.state.runtime
    runtime.notify("node registered")
    return registered


@router.post("/heartbeat", response_model=HeartbeatReply)
async def heartbeat(
    request: Request,
    body: Heartbeat,
    principal: AutocommitAgentPrincipal,
    auth_session: AutocommitSessionDep,
) -> Response:
    """GPU samples, task states and log chunks in; tasks to start and to stop out.

    With `wait_s` > 0 and nothing new to say on either side, the reply is held up to
    min(`wait_s`, the server's `heartbeat_long_poll_s`) and sent as soon as the node has work.
    A heartbeat that changes nothing is answered after one read; its liveness and samples reach
    the database within `heartbeat_flush_interval_s` (scheduler/services/heartbeat/buffer.py).
    """
    assert principal.node_id is not None
    # Authentication is done: its connection goes back to the pool, not held with the request.
    await auth_session.close()
    heartbeats: Heartbeats = request.app.state.heartbeats
    caller = Caller(
        node_id=principal.node_id,
        credential_hash=hash_token(parse_bearer(request.headers.get("authorization", "")) or ""),
        expires_at=principal.expires_at,
        token_id=principal.token_id,
    )
    # The direct route (api/direct.py) has already found that it needs the full path.
    classified = getattr(request.state, "direct_route_tried", False)
    reply = await heartbeats.answer(caller, body, quiet=not classified)
    assert reply is not None  # the full path always answers
    if reply.credential is not None:  # renewed: its first use is let through (api/authfailures)
        request.app.state.auth_cache.vouch(hash_token(reply.credential))
    return Response(work.reply_json(reply), media_type="application/json")


@router.get("/tasks/{task_id}/job-gpu-use", response_model=JobGpuUse)
async def job_gpu_use(
    task_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    principal: AgentPrincipal,
    session: SessionDep,
) -> JobGpuUse:
    """The busy GPU-seconds of the task's job on its other nodes (the usage ledger's total, which
    only grows), read by rank 0's agent before it warns or ends a multi-node interactive session
    as idle. Only for a task of the calling node: any other is 404."""
    assert principal.node_id is not None
    busy_s = await other_ranks_busy_s(session, node_id=principal.node_id, task_id=task_id)
    return JobGpuUse(busy_gpu_seconds=busy_s)
