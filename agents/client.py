"""The agent's HTTP client for the agent protocol (protocol/agent.py); outbound calls only."""

from __future__ import annotations

import ssl
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from agents import srcport
from protocol.agent import AgentRegister, AgentRegistered, Heartbeat, HeartbeatReply, JobGpuUse

M = TypeVar("M", bound=BaseModel)


class AuthError(Exception):
    """The server refused the join token or the node credential: retrying will not help."""


class ServerUnavailable(Exception):
    """The server could not be reached or failed; the agent keeps its reports and retries."""


class AgentClient:
    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
        privileged_source_port: bool = False,
    ) -> None:
        self._timeout_s = timeout_s
        self.tls = tls  # also for the WebSocket streams (agents/streams.py)
        verify: ssl.SSLContext | bool = tls if tls is not None else True
        # As root, from a port no task can take (agents/srcport.py); behind a proxy, httpx's.
        self.privileged_source_port = privileged_source_port and not srcport.proxied(base_url)
        if transport is None and self.privileged_source_port:
            transport = srcport.PrivilegedPortTransport(verify=verify)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), transport=transport, timeout=timeout_s, verify=verify
        )

    async def register(self, join_token: str, body: AgentRegister) -> AgentRegistered:
        return await self._post(
            "/v1/agent/register", join_token, body, AgentRegistered, self._timeout_s
        )

    async def heartbeat(self, credential: str, body: Heartbeat) -> HeartbeatReply:
        # The server may hold a long-poll for wait_s: the read timeout must outlast it.
        timeout_s = self._timeout_s + body.wait_s
        return await self._post("/v1/agent/heartbeat", credential, body, HeartbeatReply, timeout_s)

    async def job_gpu_use(self, credential: str, task_id: int) -> JobGpuUse:
        path = f"/v1/agent/tasks/{task_id}/job-gpu-use"
        return await self._call("GET", path, credential, None, JobGpuUse, self._timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(
        self, path: str, token: str, body: BaseModel, reply: type[M], timeout_s: float
    ) -> M:
        return await self._call("POST", path, token, body, reply, timeout_s)

    async def _call(
        self,
        method: str,
        path: str,
        token: str,
        body: BaseModel | None,
        reply: type[M],
        timeout_s: float,
    ) -> M:
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(
                method,
                path,
                content=body.model_dump_json() if body is not None else None,
                headers=headers,
                timeout=timeout_s,
            )
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            raise AuthError(f"{path}: {response.status_code} {_detail(response)}")
        if response.status_code >= 400:
            raise ServerUnavailable(f"{path}: {response.status_code} {_detail(response)}")
        try:
            return reply.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServerUnavailable(f"{path}: unexpected reply: {exc}") from exc


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:200]
    return str(body)[:200]
