"""WebSocket terminal streams: a user's `attach` and the node agent's side, relayed frame by frame.

    WS /v1/jobs/{job}/attach?rank=N           Authorization: Bearer <user token>
    WS /v1/agent/streams/{id}                 Authorization: Bearer <node credential>
    WS /v1/relay/streams/{id}                 Authorization: Bearer <relay secret>

The user side opens a stream row (services/streams.py) naming this process and wakes the
node's long-poll; the agent, told in a heartbeat reply by whichever process answers it, opens
the agent side outbound, on whichever process it reaches. That process claims the stream and,
when another one holds the user's side, relays to it (the third route). Nodes never listen. The
frames are those of protocol/streams.py; docs/INTERACTIVE.md has the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from api.deps import Principal, authenticate, parse_bearer
from api.problems import PROBLEM_MEDIA_TYPE, problem_body
from api.relayhop import RELAY_PATH, carry, connect_holder
from api.routers.jobs.view import JobRef, scope_of
from api.streamauth import POLICY_VIOLATION, watch
from api.streamlimits import StreamLimits
from api.streammetrics import StreamMeter
from protocol.streams import MAX_FRAME_BYTES, Error, Exit, control_text, parse_control
from scheduler.db.engine import run_to_end
from scheduler.db.types import utcnow
from scheduler.services import interactive
from scheduler.services.errors import DomainError, Forbidden, NotFound, Unauthenticated
from scheduler.services.interactive import AttachTarget
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.streamrows import StreamOwner
from scheduler.services.streams import PendingStream, StreamHub, StreamKind

log = logging.getLogger(__name__)
router = APIRouter(tags=["interactive"])

UVICORN_WEBSOCKETS: dict[str, Any] = {
    # The client's address is the peer's, or what FAIRGPU_TRUSTED_PROXIES forward
    # (api/authfailures.py); uvicorn's own rewriting would believe any loopback peer.
    "proxy_headers": False,
    "ws": "websockets-sansio",
    "ws_max_size": MAX_FRAME_BYTES,  # a larger frame closes the stream (1009)
    "ws_per_message_deflate": False,  # terminal bytes are small; compression costs CPU
}
"""uvicorn's settings for a server (cli/server.py, the tests' servers)."""
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
async def attach(websocket: WebSocket, job_id: JobRef, rank: int = 0, new: bool = False) -> None:
    """Attach to a running job's terminal (rank 0 of a `run --pty` job), or with `new=true`
    open a new shell in the sandbox of rank `rank` of any running job (on a terminal of its
    own, ending with its connection). The job's owner, an org-admin of its org or a platform
    admin: a member who is not the owner gets 403, another org's user 404. Every attach and new
    shell is an event on the job; a job has at most 8 terminals, attached clients and new
    shells together (429 beyond). Frames: protocol/streams.py."""
    with contextlib.ExitStack() as held:
        try:
            stream = await open_user_stream(
                websocket,
                held,
                job_id,
                rank=rank,
                doing="opening a shell" if new else "attaching",
                find=interactive.new_shell_target if new else interactive.attach_target,
                record=functools.partial(interactive.record_terminal, new=new),
                kind="new" if new else "attach",
            )
        except DomainError as error:
            await deny(websocket, error)
            return
        await relay_to_agent(websocket, stream)


async def open_user_stream(
    websocket: WebSocket,
    held: contextlib.ExitStack,
    job_id: str,
    *,
    rank: int,
    doing: str,
    find: Callable[..., Awaitable[AttachTarget]],
    record: Callable[..., Awaitable[int | None]],
    kind: StreamKind,
    port: int | None = None,
) -> PendingStream:
    """The user's stream into `job_id`'s rank `rank` (attach or forward), once the caller may
    (`find`: who may, as a DomainError) and there is room: its place in this process held in
    `held`, its row opened under the per-user, per-org and per-job bounds, its event (`record`)
    committed with its row (and, when `record` names an event to count this stream in, a
    forward session's, the stream's end is counted there)."""
    principal, user_id = await user_principal(websocket, doing)
    limits: StreamLimits = websocket.app.state.stream_limits
    limits.charge(user_id=user_id, org_id=principal.org_id)
    held.enter_context(limits.slot("user"))
    owner = StreamOwner(user_id=user_id, org_id=principal.org_id)

    async def transaction() -> PendingStream:
        async with websocket.app.state.sessionmaker() as session:
            target = await find(
                session,
                job_id,
                rank=rank,
                user_id=user_id,
                scope_org_id=scope_of(principal),
                may_admin_org=principal.can_admin_org,
            )
            event_id = await record(
                session,
                target,
                actor=principal.actor,
                max_events=websocket.app.state.settings.max_job_events_per_kind,
            )
            stream = await open_stream(websocket, session, target, kind, owner, port)
            await session.commit()
        stream.event_id = event_id
        return stream

    # To its end even if the handler is cancelled: it may wait on the job's row and the user's
    # and org's locks behind other openings, and a cancellation there left the connection
    # mid-statement ("another operation is in progress" for the next request to get it).
    return await run_to_end(transaction())


async def open_stream(
    websocket: WebSocket,
    session: AsyncSession,
    target: AttachTarget,
    kind: StreamKind,
    owner: StreamOwner,
    port: int | None = None,
) -> PendingStream:
    """The stream's row, in the caller's transaction, naming this process as its holder."""
    hub: StreamHub = websocket.app.state.streams
    limits: StreamLimits = websocket.app.state.stream_limits
    return await hub.open(
        session,
        target,
        kind,
        owner=owner,
        caps=limits.caps,
        holder_url=relay_url(websocket),
        port=port,
    )


def relay_url(websocket: WebSocket) -> str:
    """Where the other server processes reach this one (`FAIRGPU_SERVER_RELAY_URL`), else the
    address this connection reached it at: right when one process serves alone."""
    hub: StreamHub = websocket.app.state.streams
    if hub.relay_url is not None:
        return hub.relay_url
    host, port = websocket.scope.get("server") or ("127.0.0.1", 80)
    scheme = "https" if websocket.url.scheme == "wss" else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def relay_to_agent(websocket: WebSocket, stream: PendingStream) -> None:
    """Ask the node's agent for its side of the committed stream, accept the user's, and
    relay; its row goes when it ends, when the agent does not come in time, or as soon as the
    user leaves while it waits (their pending place is free again at once)."""
    hub: StreamHub = websocket.app.state.streams
    hub.publish(stream)
    try:
        runtime: SchedulerRuntime = websocket.app.state.runtime
        runtime.wake_nodes([stream.node_id])
        await websocket.accept()
        early: list[Message] = []
        try:
            agent = await _agent_unless_user_leaves(websocket, stream, early)
        except TimeoutError:
            await _fail(
                websocket,
                f"the node's agent did not open the stream within {AGENT_WAIT_S:g} s (its node "
                "may be down, or the server processes cannot reach each other: "
                "FAIRGPU_SERVER_RELAY_URL, docs/OPERATIONS.md)",
            )
            return
        if agent is None:
            return  # the user left before the agent came
        try:
            await _relay(websocket, agent, stream, early)
        finally:
            stream.done.set()
    finally:
        if not stream.agent.done():
            stream.agent.cancel()  # an agent's side arriving now is turned away
        # One that arrived just as the wait ended (its WebSocket set as a result nobody
        # read) returns and closes, instead of holding its connection for ever.
        stream.done.set()
        await hub.end(stream)


MAX_EARLY_FRAMES = 64
MAX_EARLY_BYTES = 64 * 1024
"""What the user may send before the agent's side comes (a resize, early keystrokes) that is
kept for it; beyond, the user's side is not read until the agent comes."""


async def _agent_unless_user_leaves(
    websocket: WebSocket, stream: PendingStream, early: list[Message]
) -> WebSocket | None:
    """The agent's side once it comes (TimeoutError after AGENT_WAIT_S), or None as soon as the
    user's side disconnects having sent nothing. The user's frames read meanwhile are kept in
    `early`; one who sent some and left (a resize that starts a terminal's program, as `run
    --jupyter` does; a forwarded connection's request) still has them delivered: the wait goes
    on, and their disconnect is kept after them."""

    async def listen() -> bool:
        """True when the user left having sent nothing; False when reading stops (`early` is
        full, or ends with the user's leaving)."""
        size = 0
        while len(early) < MAX_EARLY_FRAMES and size < MAX_EARLY_BYTES:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                if not early:
                    return True
                early.append(message)
                return False
            early.append(message)
            size += len(message.get("bytes") or b"") + len(message.get("text") or "")
        return False

    agent = asyncio.ensure_future(asyncio.shield(stream.agent))
    listener = asyncio.create_task(listen())
    waiting: set[asyncio.Future[Any]] = {agent, listener}
    try:
        async with asyncio.timeout(AGENT_WAIT_S):
            while agent in waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if listener in done and listener.result():
                    return None
        result: WebSocket = agent.result()
        return result
    finally:
        for task in (listener, agent):
            task.cancel()
        await asyncio.gather(listener, agent, return_exceptions=True)


@router.websocket("/v1/agent/streams/{stream_id}")
async def agent_stream(websocket: WebSocket, stream_id: str) -> None:
    """The agent's side of a stream the heartbeat reply asked it to open; only the node the
    stream is for may open it, once (404 otherwise, also for a user token). A stream whose
    user's side another server process holds is relayed there (api/relayhop.py). It takes one
    of this process's stream places (429 before the claim when none is left)."""
    limits: StreamLimits = websocket.app.state.stream_limits
    with contextlib.ExitStack() as held:
        try:
            principal = await _principal(websocket)
            hub: StreamHub = websocket.app.state.streams
            node_id = principal.node_id if principal.kind == "agent" else None
            if node_id is None:
                raise NotFound("no such stream for this node")
            held.enter_context(limits.slot("node"))
            claim = await hub.claim(stream_id, node_id)
            if claim is None:
                raise NotFound("no such stream for this node")
            holder = await connect_holder(claim) if claim.holder_id != hub.holder_id else None
        except DomainError as error:
            await deny(websocket, error)
            return
        if holder is not None:
            await carry(websocket, holder, claim.kind)
        else:
            await _hand_over(websocket, claim.local)


@router.websocket(RELAY_PATH)
async def relay_hop(websocket: WebSocket, stream_id: str) -> None:
    """Another server process's hop for a stream this one holds: the node's agent reached
    that process. Only with the secret that process chose when it claimed the stream for the
    node (its hash is in the stream's row); anything else is 404, whoever asks."""
    hub: StreamHub = websocket.app.state.streams
    secret = parse_bearer(websocket.headers.get("authorization", ""))
    stream = hub.local(stream_id)
    if secret is None or stream is None or not await hub.relay_secret_ok(stream_id, secret):
        await deny(websocket, NotFound("no such stream here"))
        return
    await _hand_over(websocket, stream)


async def _hand_over(websocket: WebSocket, stream: PendingStream | None) -> None:
    """The agent's side (or the hop carrying it) to the waiting user's side, until the relay
    ends."""
    await websocket.accept()
    if stream is None or stream.agent.done():  # the user's side gave up meanwhile
        await _fail(websocket, "the user's side of this stream has left")
        return
    stream.agent.set_result(websocket)
    await stream.done.wait()


async def _relay(
    user: WebSocket, agent: WebSocket, stream: PendingStream, early: list[Message]
) -> None:
    """Frame by frame both ways until either side ends, or the user may no longer hold the
    stream (api/streamauth.py: checked every `stream_auth_recheck_s`), what the user sent
    before the agent came (`early`) first; one frame in flight per direction."""
    exited = asyncio.Event()
    user_left = asyncio.Event()

    async def agent_to_user() -> None:
        while True:
            message = await agent.receive()
            if message["type"] == "websocket.disconnect":
                return
            if (data := message.get("bytes")) is not None:
                meter.from_job(len(data))
                stream.bytes_from_job += len(data)
                await user.send_bytes(data)
            elif (text := message.get("text")) is not None:
                meter.from_job(0)
                if isinstance(parse_control(text), Exit | Error):
                    exited.set()
                await user.send_text(text)

    async def user_to_agent() -> None:
        for message in early:
            if message["type"] == "websocket.disconnect":
                user_left.set()  # left before the agent came, once it had said something
                return
            await to_agent(message)
        while True:
            message = await user.receive()
            if message["type"] == "websocket.disconnect":
                user_left.set()  # a detach: the session goes on
                return
            await to_agent(message)

    async def to_agent(message: Message) -> None:
        if (data := message.get("bytes")) is not None:
            meter.to_job(len(data))
            stream.bytes_to_job += len(data)
            await agent.send_bytes(data)
        elif (text := message.get("text")) is not None:
            await agent.send_text(text)

    meter = StreamMeter(stream.kind, stream.requested_at)
    every_s = user.app.state.settings.stream_auth_recheck_s
    watcher = asyncio.create_task(watch(user, stream.job_id, every_s))
    pumps = {asyncio.create_task(agent_to_user()), asyncio.create_task(user_to_agent()), watcher}
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
    refused = watcher.result() if watcher.done() and not watcher.cancelled() else None
    if isinstance(refused, str):
        log.info("stream %s into job %s closed: %s", stream.id, stream.job_id, refused)
        await _fail(user, f"the stream was closed: {refused}", POLICY_VIOLATION, refused)
    # A forwarded connection ends when its agent closes it; a terminal ends with its exit.
    elif stream.kind != "port" and not exited.is_set() and not user_left.is_set():
        await _fail(user, AGENT_GONE.format(job=stream.job_id))
    await _close(agent)
    await _close(user)


async def _fail(
    websocket: WebSocket, message: str, code: int = 1011, reason: str | None = None
) -> None:
    """The error as a control frame (the CLI prints it), then the close with `code`."""
    with contextlib.suppress(Exception):
        if websocket.application_state is WebSocketState.CONNECTED:
            await websocket.send_text(control_text(Error(type="error", message=message)))
    await _close(websocket, code, reason)


async def _close(websocket: WebSocket, code: int = 1000, reason: str | None = None) -> None:
    with contextlib.suppress(Exception):
        if websocket.application_state is WebSocketState.CONNECTED:
            await websocket.close(code, reason)
