"""WebSocket port-forward streams: one forwarded TCP connection each (`fairgpu port-forward`).

    WS /v1/jobs/{job}/forward?port=P&rank=N&session=S   Authorization: Bearer <user token>

Who may forward is who may attach (scheduler/services/interactive.py): the job's owner, an
org-admin of its org or a platform admin; another org's user gets 404, a member who is not the
owner 403. The node's agent opens the other side as for a terminal (api/routers/streams.py) and
connects it only to a port that the job itself listens on (agents/ports.py). Every forward
session (one `port-forward` run) is one event on the job, counting its connections; a job has
at most 64 connections open, whichever server processes hold them
(scheduler/services/streamrows.MAX_OPEN).
"""

from __future__ import annotations

import contextlib
import functools
import re

from fastapi import APIRouter, WebSocket

from api.routers.jobs.view import JobRef
from api.routers.streams import deny, open_user_stream, relay_to_agent
from scheduler.services import forwarding
from scheduler.services.errors import DomainError, InvalidInput
from scheduler.services.streams import PendingStream

router = APIRouter(tags=["interactive"])
SESSION = re.compile(r"[0-9a-f]{16}")


@router.websocket("/v1/jobs/{job_id}/forward")
async def forward(
    websocket: WebSocket, job_id: JobRef, port: int, rank: int = 0, session: str | None = None
) -> None:
    """Forward one TCP connection to `port` of rank `rank`'s task of a running job, which
    must itself listen there (the agent refuses any other port, with a message). Binary frames
    are the connection's bytes; `{"type": "eof"}` a half-close (protocol/tcpstream.py).
    `session` (16 hex digits, the CLI's random id for one `port-forward` run) makes its
    connections one event, which counts them and their bytes, instead of one each."""
    with contextlib.ExitStack() as held:
        try:
            if session is not None and not SESSION.fullmatch(session):
                raise InvalidInput("session: 16 hexadecimal digits (a port-forward run's id)")
            stream = await _authorised(websocket, job_id, port, rank, held, session)
        except DomainError as error:
            await deny(websocket, error)
            return
        await relay_to_agent(websocket, stream)


async def _authorised(
    websocket: WebSocket,
    job_id: str,
    port: int,
    rank: int,
    held: contextlib.ExitStack,
    session: str | None,
) -> PendingStream:
    """The stream to the task, once the caller may and the job has room (429 beyond 64
    open), with its place in this process held in `held` and the event recorded."""
    if not 0 < port < 65536:
        raise InvalidInput(f"port {port} is not a TCP port (1-65535)")
    return await open_user_stream(
        websocket,
        held,
        job_id,
        rank=rank,
        doing="forwarding",
        find=forwarding.forward_target,
        record=functools.partial(forwarding.record_forward, port=port, forward_session=session),
        kind="port",
        port=port,
    )
