"""One call shared by the concurrent requests that need its answer: the cluster read behind
`/metrics`, the database check behind `/readyz`. Neither needs a token, so a flood of them held
one pool connection each; now those arriving while one call is under way await that call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import FastAPI

T = TypeVar("T")


async def shared_call(app: FastAPI, name: str, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """The call under way as `name` on this app, or a new one; a request that goes away does not
    cancel it for the others."""
    under_way: asyncio.Task[T] | None = getattr(app.state, name, None)
    if under_way is None or under_way.done():
        under_way = asyncio.create_task(call(), name=f"fairgpu-{name}")
        setattr(app.state, name, under_way)
    return await asyncio.shield(under_way)
