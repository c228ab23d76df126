"""A relay listener of this process's own, when `FAIRGPU_SERVER_RELAY_URL` names a port other
than the server's.

The workers of `fairgpu server --workers N` share one listening socket: the address the users
reach cannot name one worker. A worker that holds a stream's user side must be reachable by the
others, so each listens on a port of its own (port 0: a free one) on the relay URL's host,
serving the relay route only (api/routers/streams.py, `WS /v1/relay/streams/{id}`), and the
rows name that port. A replica may also keep the hop off its public port this way (a fixed
internal port that only the other replicas may reach).
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

from api.headlimits import bounded_http
from scheduler.services.streams import StreamHub


class _Listener(uvicorn.Server):
    """A second uvicorn server in a process that runs one already: the signals stay the
    first one's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


@asynccontextmanager
async def relay_listener(hub: StreamHub, server_port: int) -> AsyncIterator[None]:
    """With a relay URL whose port is not `server_port`: listen on its host and port (0: a
    free one, which becomes the hub's relay URL). Otherwise nothing."""
    from api.relayhop import RELAY_PATH
    from api.routers import streams  # the relay route, and uvicorn's WebSocket settings

    parts = urlsplit(hub.relay_url or "")
    if parts.port is None or parts.port == server_port:
        yield
        return
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(
            "FAIRGPU_SERVER_RELAY_URL on a port of its own is http://HOST:PORT (a listener for "
            "the other server processes only; HTTPS is served on the server's own port)"
        )
    family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((parts.hostname, parts.port))
    port = sock.getsockname()[1]
    host = f"[{parts.hostname}]" if family == socket.AF_INET6 else parts.hostname
    hub.relay_url = f"http://{host}:{port}"
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.streams = hub
    app.add_api_websocket_route(RELAY_PATH, streams.relay_hop)
    server = _Listener(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=bounded_http(),
            **streams.UVICORN_WEBSOCKETS,
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
