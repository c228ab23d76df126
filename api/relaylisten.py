"""A relay listener of this process's own, for `FAIRGPU_SERVER_RELAY_URL` with port 0.

The workers of `fairgpu server --workers N` share one listening socket: the address the users
reach cannot name one worker. A worker that holds a stream's user side must be reachable by the
others, so each listens on a port of its own on the relay URL's host, serving the relay route
only (api/routers/streams.py, `WS /v1/relay/streams/{id}`), and the rows name that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI

from scheduler.services.streams import StreamHub


class _Listener(uvicorn.Server):
    """A second uvicorn server in a process that runs one already: the signals stay the
    first one's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


@asynccontextmanager
async def relay_listener(hub: StreamHub) -> AsyncIterator[None]:
    """With a relay URL of port 0: listen on its host, on a free port, and make that the
    hub's relay URL. Otherwise nothing."""
    from api.relayhop import RELAY_PATH
    from api.routers import streams  # the relay route, and uvicorn's WebSocket settings

    if hub.relay_url is None or urlsplit(hub.relay_url).port != 0:
        yield
        return
    parts = urlsplit(hub.relay_url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(
            "FAIRGPU_SERVER_RELAY_URL with port 0 is http://HOST:0 (a listener of each worker's "
            "own on HOST, for the other server processes only)"
        )
    family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((parts.hostname, 0))
    port = sock.getsockname()[1]
    host = f"[{parts.hostname}]" if family == socket.AF_INET6 else parts.hostname
    hub.relay_url = f"http://{host}:{port}"
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.streams = hub
    app.add_api_websocket_route(RELAY_PATH, streams.relay_hop)
    server = _Listener(
        uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, **streams.UVICORN_WEBSOCKETS
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="fairgpu-relay-listener")
    try:
        while not server.started:
            if task.done():
                task.result()  # its error
                raise RuntimeError("the relay listener did not start")
            await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()
