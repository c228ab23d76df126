"""WebSocket port-forward streams: one forwarded TCP connection each (`fairgpu port-forward`).

    WS /v1/jobs/{job}/forward?port=P&rank=N   Authorization: Bearer <user token>

Who may forward is who may attach (scheduler/services/interactive.py): the job's owner, an
org-admin of its org or a platform admin; another org's user gets 404, a member who is not the
owner 403. The node's agent opens the other side as for a terminal (api/routers/streams.py) and
connects it only to a port that the job itself listens on (agents/ports.py). Every forward is
an event on the job; a job has at most `MAX_FORWARDS_PER_JOB` open in one server process.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from fastapi import APIRouter, WebSocket

from api.routers.jobs import scope_of
from api.routers.streams import deny, relay_to_agent, user_principal
from api.streamlimits import StreamLimits, Ticket
from scheduler.services import forwarding
from scheduler.services.errors import DomainError, InvalidInput, TooManyRequests
from scheduler.services.interactive import AttachTarget

router = APIRouter(tags=["interactive"])

MAX_FORWARDS_PER_JOB = 64
"""Open forwarded connections of one job in one server process: what one user's browser tabs
need, and a bound on the streams one tenant can ask a node's agent to open."""


def _open_forwards(websocket: WebSocket) -> Counter[int]:
    state = websocket.app.state
    if not hasattr(state, "open_forwards"):
        state.open_forwards = Counter()
    forwards: Counter[int] = state.open_forwards
    return forwards


@router.websocket("/v1/jobs/{job_id}/forward")
async def forward(websocket: WebSocket, job_id: int, port: int, rank: int = 0) -> None:
    """Forward one TCP connection to `port` of rank `rank`'s task of a running job, which
    must itself listen there (the agent refuses any other port, with a message). Binary frames
    are the connection's bytes; `{"type": "eof"}` a half-close (protocol/tcpstream.py)."""
    forwards = _open_forwards(websocket)
    with contextlib.ExitStack() as held:
        try:
            target, ticket = await _authorised(websocket, job_id, port, rank, forwards, held)
        except DomainError as error:
            await deny(websocket, error)
            return
        try:
            await relay_to_agent(websocket, target, "port", port, ticket=ticket)
        finally:
            forwards[target.job_id] -= 1
            if not forwards[target.job_id]:
                del forwards[target.job_id]


async def _authorised(
    websocket: WebSocket,
    job_id: int,
    port: int,
    rank: int,
    forwards: Counter[int],
    held: contextlib.ExitStack,
) -> tuple[AttachTarget, Ticket]:
    """The task to forward to, once the caller may and the job has room; its slot in
    `forwards` is taken (the caller gives it back), its place in the stream limits is held
    in `held`, and the event recorded."""
    if not 0 < port < 65536:
        raise InvalidInput(f"port {port} is not a TCP port (1-65535)")
    principal, user_id = await user_principal(websocket, "forwarding")
    limits: StreamLimits = websocket.app.state.stream_limits
    limits.charge(user_id=user_id, org_id=principal.org_id)
    async with websocket.app.state.sessionmaker() as session:
        target = await forwarding.forward_target(
            session,
            job_id,
            rank=rank,
            user_id=user_id,
            scope_org_id=scope_of(principal),
            may_admin_org=principal.can_admin_org,
        )
        if forwards[target.job_id] >= MAX_FORWARDS_PER_JOB:
            raise TooManyRequests(
                f"job {target.job_id} has {MAX_FORWARDS_PER_JOB} forwarded connections open "
                "already; close some first"
            )
        ticket = held.enter_context(
            limits.open(user_id=user_id, org_id=principal.org_id, job_id=target.job_id)
        )
        forwards[target.job_id] += 1  # no await since the check: no other request sneaks in
        try:
            forwarding.record_forward(session, target, actor=principal.actor, port=port)
            await session.commit()
        except BaseException:
            forwards[target.job_id] -= 1
            raise
    return target, ticket
