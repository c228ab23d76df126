"""WebSocket terminal streams: a user's `attach` and the node agent's side, relayed frame by frame.

    WS /v1/jobs/{job}/attach?rank=N           Authorization: Bearer <user token>
    WS /v1/agent/streams/{id}                 Authorization: Bearer <node credential>

The user side registers a pending stream (services/streams.py) and wakes the node's long-poll;
the agent, told in its heartbeat reply, opens the agent side outbound. Nodes never listen. The
frames are those of protocol/streams.py; docs/INTERACTIVE.md has the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from api.deps import Principal, authenticate, parse_bearer
from api.problems import PROBLEM_MEDIA_TYPE, problem_body
from api.routers.jobs import scope_of
from api.streamlimits import StreamLimits, Ticket
from api.streammetrics import StreamMeter
from protocol.streams import MAX_FRAME_BYTES, Error, Exit, control_text, parse_control
from scheduler.db.types import utcnow
from scheduler.services import interactive
from scheduler.services.errors import DomainError, Forbidden, NotFound, Unauthenticated
from scheduler.services.interactive import AttachTarget
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.streams import PendingStream, StreamHub, StreamKind

log = logging.getLogger(__name__)
router = APIRouter(tags=["interactive"])

UVICORN_WEBSOCKETS: dict[str, Any] = {
    "ws": "websockets-sansio",
    "ws_max_size": MAX_FRAME_BYTES,  # a larger frame closes the stream (1009)
    "ws_per_message_deflate": False,  # terminal bytes are small; compression costs CPU
}
"""uvicorn's WebSocket settings for a server (cli/server.py, the tests' servers)."""
AGENT_WAIT_S = 15.0
"""How long a user's attach waits for the node's agent to open its side."""
AGENT_GONE = (
    "the node's agent closed the stream without an exit status (it stopped or lost its "
    "connection); the job may still be running: `fairgpu attach {job}` once the node is back"
)


async def _principal(websocket: WebSocket) -> Principal:
    secret = parse_bearer(websocket.headers.get("authorization", ""))
    if secret is None:
        raise Unauthenticated("missing or malformed bearer token (Authorization: Bearer <token>)")
    async with websocket.app.state.sessionmaker() as session:
        principal = await authenticate(
            session, secret, utcnow(), getattr(websocket.app.state, "auth_cache", None)
        )
        await session.rollback()
    return principal


async def user_principal(websocket: WebSocket, doing: str) -> tuple[Principal, int]:
    """The user behind a stream's token, and their id: a node credential or a join token opens
    no user stream (`doing`: what was asked, for the 403)."""
    principal = await _principal(websocket)
    if principal.kind != "user" or principal.user_id is None:
        raise Forbidden(f"{doing} needs a user token")
    return principal, principal.user_id


async def deny(websocket: WebSocket, error: DomainError) -> None:
    """A problem answer instead of the WebSocket handshake (RFC 9457, as every route), with
    Retry-After for a 429 as on every route."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.status == 429:
        headers["Retry-After"] = str(error.extra.get("retry_after_s", 1))
    await websocket.send_denial_response(
        JSONResponse(
            problem_body(error.status, str(error), websocket.url.path, **error.extra),
            status_code=error.status,
            media_type=PROBLEM_MEDIA_TYPE,
            headers=headers,
        )
    )


@router.websocket("/v1/jobs/{job_id}/attach")
async def attach(websocket: WebSocket, job_id: int, rank: int = 0) -> None:
    """Attach to a running job's terminal (rank 0 of a `run --pty` job). The job's owner, an
    org-admin of its org or a platform admin: a member who is not the owner gets 403, another
    org's user 404. Every attach is an event on the job. Frames: protocol/streams.py."""
    limits: StreamLimits = websocket.app.state.stream_limits
    with contextlib.ExitStack() as held:
        try:
            principal, user_id = await user_principal(websocket, "attaching")
            limits.charge(user_id=user_id, org_id=principal.org_id)
            async with websocket.app.state.sessionmaker() as session:
                target = await interactive.attach_target(
                    session,
                    job_id,
                    rank=rank,
                    user_id=user_id,
                    scope_org_id=scope_of(principal),
                    may_admin_org=principal.can_admin_org,
                )
                ticket = held.enter_context(
                    limits.open(user_id=user_id, org_id=principal.org_id, job_id=target.job_id)
                )
                interactive.record_attach(session, target, actor=principal.actor)
                await session.commit()
        except DomainError as error:
            await deny(websocket, error)
            return
        await relay_to_agent(websocket, target, "attach", ticket=ticket)


async def relay_to_agent(
    websocket: WebSocket,
    target: AttachTarget,
    kind: StreamKind,
    port: int | None = None,
    *,
    ticket: Ticket,
) -> None:
    """Ask the node's agent for its side of the stream, accept the user's, and relay; the
    stream stops counting as pending (`ticket`) once the agent came or the wait ended."""
    hub: StreamHub = websocket.app.state.streams
    stream = hub.request(
        job_id=target.job_id,
        task_id=target.task_id,
        node_id=target.node_id,
        kind=kind,
        port=port,
    )
    runtime: SchedulerRuntime = websocket.app.state.runtime
    runtime.wake_nodes([target.node_id])
    await websocket.accept()
    try:
        agent = await asyncio.wait_for(asyncio.shield(stream.agent), AGENT_WAIT_S)
        ticket.claimed()
    except TimeoutError:
        hub.cancel(stream)
        await _fail(
            websocket,
            f"the node's agent did not open the stream within {AGENT_WAIT_S:g} s (its node may "
            "be down; a server of several processes relays only when one process holds both "
            "sides, docs/INTERACTIVE.md)",
        )
        return
    try:
        await _relay(websocket, agent, stream)
    finally:
        stream.done.set()


@router.websocket("/v1/agent/streams/{stream_id}")
async def agent_stream(websocket: WebSocket, stream_id: str) -> None:
    """The agent's side of a stream the heartbeat reply asked it to open; only the node the
    stream is for may open it (404 otherwise, also for a user token)."""
    try:
        principal = await _principal(websocket)
        hub: StreamHub = websocket.app.state.streams
        node_id = principal.node_id if principal.kind == "agent" else None
        stream = hub.claim(stream_id, node_id) if node_id is not None else None
        if stream is None:
            raise NotFound("no such stream for this node")
    except DomainError as error:
        await deny(websocket, error)
        return
    await websocket.accept()
    if stream.agent.done():  # the user side gave up meanwhile
        await websocket.close()
        return
    stream.agent.set_result(websocket)
    await stream.done.wait()


async def _relay(user: WebSocket, agent: WebSocket, stream: PendingStream) -> None:
    """Frame by frame both ways until either side ends; one frame in flight per direction."""
    exited = asyncio.Event()
    user_left = asyncio.Event()

    async def agent_to_user() -> None:
        while True:
            message = await agent.receive()
            if message["type"] == "websocket.disconnect":
                return
            if (data := message.get("bytes")) is not None:
                meter.from_job(len(data))
                await user.send_bytes(data)
            elif (text := message.get("text")) is not None:
                meter.from_job(0)
                if isinstance(parse_control(text), Exit | Error):
                    exited.set()
                await user.send_text(text)

    async def user_to_agent() -> None:
        while True:
            message = await user.receive()
            if message["type"] == "websocket.disconnect":
                user_left.set()  # a detach: the session goes on
                return
            if (data := message.get("bytes")) is not None:
                meter.to_job(len(data))
                await agent.send_bytes(data)
            elif (text := message.get("text")) is not None:
                await agent.send_text(text)

    meter = StreamMeter(stream.kind, stream.requested_at)
    pumps = {asyncio.create_task(agent_to_user()), asyncio.create_task(user_to_agent())}
    try:
        with meter:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        results = await asyncio.gather(*pumps, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(
            result, WebSocketDisconnect | RuntimeError | asyncio.CancelledError
        ):
            log.warning("stream %s: relay ended with %r", stream.id, result)
    # A forwarded connection ends when its agent closes it; a terminal ends with its exit.
    if stream.kind != "port" and not exited.is_set() and not user_left.is_set():
        await _fail(user, AGENT_GONE.format(job=stream.job_id))
    await _close(agent)
    await _close(user)


async def _fail(websocket: WebSocket, message: str) -> None:
    with contextlib.suppress(Exception):
        if websocket.application_state is WebSocketState.CONNECTED:
            await websocket.send_text(control_text(Error(type="error", message=message)))
    await _close(websocket, 1011)


async def _close(websocket: WebSocket, code: int = 1000) -> None:
    with contextlib.suppress(Exception):
        if websocket.application_state is WebSocketState.CONNECTED:
            await websocket.close(code)
