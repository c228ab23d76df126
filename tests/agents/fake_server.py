"""A tiny FastAPI app that speaks the agent protocol, standing in until the real server exists.

It follows the protocol's contract (api/schemas/agent.py): starts re-sent until the task is
reported, stops until it has ended, long-poll held until there is work, logs kept by offset.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from typing import Annotated

import httpx
from fastapi import FastAPI, Header, HTTPException

from protocol.agent import (
    AgentRegister,
    AgentRegistered,
    Heartbeat,
    HeartbeatReply,
    TaskReport,
    TaskSpec,
    TaskStop,
)
from protocol.states import TERMINAL_TASK_STATES

JOIN_TOKEN = "join-token-for-tests"


class FakeServer:
    def __init__(self, heartbeat_interval_s: float = 1.0) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.credentials: dict[str, int] = {}
        self.registrations: list[AgentRegister] = []
        self.to_start: dict[int, TaskSpec] = {}
        self.to_stop: dict[int, TaskStop] = {}
        self.reports: dict[int, TaskReport] = {}
        self.report_history: list[TaskReport] = []
        self.logs: dict[int, str] = {}
        self.log_held: dict[int, int] = {}
        self.log_complete: set[int] = set()
        self.heartbeats: list[Heartbeat] = []
        self.resend_starts_forever = False
        self.down = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.app = self._build()

    def transport(self) -> httpx.AsyncBaseTransport:
        return _Switchable(self)

    def submit(self, spec: TaskSpec) -> None:
        self.to_start[spec.task_id] = spec
        self.wake()

    def cancel(self, task_id: int, grace_s: float = 5.0) -> None:
        self.to_stop[task_id] = TaskStop(task_id=task_id, reason="cancelled", grace_s=grace_s)
        self.wake()

    def wake(self) -> None:
        """Release a held heartbeat; safe from any thread (uvicorn runs the app in its own)."""
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/agent/register")
        async def register(
            body: AgentRegister, authorization: Annotated[str, Header()]
        ) -> AgentRegistered:
            if authorization != f"Bearer {JOIN_TOKEN}":
                raise HTTPException(401, "bad join token")
            self.registrations.append(body)
            credential = secrets.token_urlsafe(24)
            self.credentials[credential] = len(self.registrations)
            return AgentRegistered(
                node_id=len(self.registrations),
                node_name=body.name,
                credential=credential,
                heartbeat_interval_s=self.heartbeat_interval_s,
            )

        @app.post("/v1/agent/heartbeat")
        async def heartbeat(
            body: Heartbeat, authorization: Annotated[str, Header()]
        ) -> HeartbeatReply:
            if authorization.removeprefix("Bearer ") not in self.credentials:
                raise HTTPException(401, "unknown credential")
            self.heartbeats.append(body)
            for report in body.tasks:
                self.reports[report.task_id] = report
                self.report_history.append(report)
                if not self.resend_starts_forever:
                    self.to_start.pop(report.task_id, None)
                if report.state in TERMINAL_TASK_STATES:
                    self.to_stop.pop(report.task_id, None)
            for chunk in body.logs:
                held = self.log_held.get(chunk.task_id, 0)
                if chunk.next_offset > held or (chunk.eof and chunk.next_offset == held):
                    self.logs[chunk.task_id] = self.logs.get(chunk.task_id, "") + chunk.data
                    self.log_held[chunk.task_id] = chunk.next_offset
                if chunk.eof:
                    self.log_complete.add(chunk.task_id)
            if self._wake is None:
                self._wake = asyncio.Event()
                self._loop = asyncio.get_running_loop()
            deadline = asyncio.get_running_loop().time() + body.wait_s
            while not (self.to_start or self.to_stop):
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            return HeartbeatReply(
                start=list(self.to_start.values()),
                stop=list(self.to_stop.values()),
                heartbeat_interval_s=self.heartbeat_interval_s,
                server_time=dt.datetime.now(dt.UTC),
            )

        return app


class _Switchable(httpx.AsyncBaseTransport):
    """The app through ASGITransport, or a refused connection while the server is `down`."""

    def __init__(self, server: FakeServer) -> None:
        self._server = server
        self._inner = httpx.ASGITransport(app=server.app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._server.down:
            raise httpx.ConnectError("connection refused (server down in test)", request=request)
        return await self._inner.handle_async_request(request)


class ServedFakeServer:
    """The fake server on a real socket (uvicorn on 127.0.0.1) for agents in other processes."""

    def __init__(self, server: FakeServer) -> None:
        import socket
        import threading

        import uvicorn

        self.server = server
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(server.app, lifespan="off", ws="none", log_level="warning")
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ServedFakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._uvicorn.should_exit = True
        self.server.wake()
        self._thread.join(timeout=10)
        self._sock.close()
