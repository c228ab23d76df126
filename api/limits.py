"""Request body size limits, enforced before anything reads the body into memory.

uvicorn and FastAPI accept a body of any size and parse it whole: one client could make a
server hold gigabytes. The largest legitimate bodies are an agent's heartbeat (64 log chunks of
64 Ki characters, up to 6 bytes each once JSON-escaped: about 25 MB) and a job (64 KiB command
and environment); anything beyond its route's limit is refused with a 413 problem, whether it
announces a Content-Length or streams in chunks.
"""

from __future__ import annotations

import json
from typing import Literal

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1024 * 1024
MAX_AGENT_BODY_BYTES = 32 * 1024 * 1024
AGENT_PREFIX = "/v1/agent/"
JOBS_PATH = "/v1/jobs"
CHANGE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
UserCharge = Literal["reads", "submissions", "changes"]


def user_charge(method: str, path: str) -> UserCharge | None:
    """The kind of rate a user's request pays into (api/admission.py), None for none."""
    if not path.startswith("/v1/") or path.startswith(AGENT_PREFIX):
        return None
    if method == "GET":
        return "reads"
    if method == "POST" and path == JOBS_PATH:
        return "submissions"
    if method in CHANGE_METHODS:
        return "changes"
    return None


def _limit_bytes(path: str) -> int:
    return MAX_AGENT_BODY_BYTES if path.startswith(AGENT_PREFIX) else MAX_BODY_BYTES


def _detail(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


async def _refuse(scope: Scope, send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "type": "https://fairgpu.dev/problems/payload-too-large",
            "title": "Payload too large",
            "status": 413,
            "detail": _detail(limit),
            "instance": scope.get("path", ""),
        }
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """ASGI middleware: 413 for a body over its route's limit (declared or streamed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _limit_bytes(scope.get("path", ""))
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _refuse(scope, send, limit)
                return
        seen = 0

        async def limited_receive() -> Message:
            # A streamed body: raised as an HTTP error so that the app's problem handler
            # answers it (FastAPI turns other exceptions while reading into a 400).
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, detail=_detail(limit))
            return message

        await self.app(scope, limited_receive, send)
