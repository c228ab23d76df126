"""The real app as an agent reaches it, seen from the wire: every registration, heartbeat and
reply recorded, a server that is down, and replies altered on their way to the agent.

`Wire` is an httpx transport around `httpx.ASGITransport(app)`, so the agent speaks the real
protocol to the real app; the test reads what crossed, and can stand in for the network (a
refused connection) or for a proxy that replays or adds messages (`alter`), to check what the
agent does with a reply the server would not send on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from protocol.agent import AgentRegister, Heartbeat, HeartbeatReply, TaskReport, TaskSpec

REGISTER_PATH = "/v1/agent/register"
HEARTBEAT_PATH = "/v1/agent/heartbeat"


class Wire(httpx.AsyncBaseTransport):
    """What the agents sent and got; `down` refuses connections, `alter` rewrites replies."""

    def __init__(self, app: object) -> None:
        self._inner = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        self.down = False
        self.alter: Callable[[HeartbeatReply], HeartbeatReply] | None = None
        self.registrations: list[AgentRegister] = []
        """Registrations the server accepted."""
        self.heartbeats: list[Heartbeat] = []
        """Heartbeats the server answered with 200, in the order sent."""
        self.replies: list[HeartbeatReply] = []
        """What the agents received (after `alter`)."""
        self.reports: dict[int, TaskReport] = {}
        """The latest report of each task that a 200 acknowledged."""
        self.log_complete: set[int] = set()
        """Tasks whose last log chunk (eof) was acknowledged."""

    def starts(self) -> dict[int, TaskSpec]:
        """Every task a reply asked an agent to start, by task id."""
        return {spec.task_id: spec for reply in self.replies for spec in reply.start}

    def task_of(self, job_id: int) -> int | None:
        """The task id of `job_id`'s start, once a reply carried it."""
        return next((t for t, spec in self.starts().items() if spec.job_id == job_id), None)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused (server down in test)", request=request)
        response = await self._inner.handle_async_request(request)
        path = request.url.path
        if response.status_code != 200 or path not in (REGISTER_PATH, HEARTBEAT_PATH):
            return response
        content = await response.aread()
        if path == REGISTER_PATH:
            self.registrations.append(AgentRegister.model_validate_json(request.content))
            return _response(response, content)
        self._heard(Heartbeat.model_validate_json(request.content))
        reply = HeartbeatReply.model_validate_json(content)
        if self.alter is not None:
            reply = self.alter(reply)
            content = reply.model_dump_json().encode()
        self.replies.append(reply)
        return _response(response, content)

    def _heard(self, heartbeat: Heartbeat) -> None:
        self.heartbeats.append(heartbeat)
        for report in heartbeat.tasks:
            self.reports[report.task_id] = report
        self.log_complete.update(chunk.task_id for chunk in heartbeat.logs if chunk.eof)


def _response(original: httpx.Response, content: bytes) -> httpx.Response:
    headers = [(k, v) for k, v in original.headers.multi_items() if k.lower() != "content-length"]
    return httpx.Response(original.status_code, headers=headers, content=content)
