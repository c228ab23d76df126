"""`fairgpu port-forward JOB LOCAL[:REMOTE]`: a local port joined to a port inside a running job.

Each TCP connection accepted on LOCAL (loopback only unless `--address` says otherwise) opens
one WebSocket stream `WS /v1/jobs/{job}/forward?port=REMOTE&rank=N`, which the server relays to
the node's agent; the agent connects it to REMOTE only if the job's own processes listen there
(docs/INTERACTIVE.md). Several connections run at once, each half-close aware
(protocol/tcpstream.py). A refusal of the stream itself (no such job, not yours) ends the
command; a refusal of one connection (nothing listens yet) is a line on stderr, and the next
connection tries again.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.client import EXIT_AUTH, ApiError, connect, report, retry_after_of
from cli.common import fail
from protocol.streams import FORWARD_PATH, MAX_FRAME_BYTES

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from cli.config import Credentials

CONNECTION_PATIENCE_S = 10.0
"""How long one local connection waits for the server's Retry-After before it is closed."""
FATAL_STATUSES = (401, 403, 404)
"""A refused stream that no later connection can change: the command ends."""


def parse_ports(text: str) -> tuple[int, int]:
    """`8888` or `8888:8888` or `0:8888` (any free local port) as (local, remote)."""
    local_text, _, remote_text = text.partition(":")
    try:
        local = int(local_text)
        remote = int(remote_text) if remote_text else local
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected LOCAL[:REMOTE], e.g. 8888 or 9000:8888"
        ) from None
    if not 0 <= local < 65536 or not 0 < remote < 65536:
        raise typer.BadParameter(f"{text!r}: ports are 1-65535 (LOCAL 0: any free port)")
    return local, remote


def port_forward(
    job: Annotated[str, typer.Argument(help="The running job's id.")],
    ports: Annotated[
        str, typer.Argument(help="LOCAL[:REMOTE], e.g. 8888 or 9000:8888 (LOCAL 0: any free).")
    ],
    rank: Annotated[int, typer.Option("--rank", min=0, help="The job's node rank.")] = 0,
    address: Annotated[
        str,
        typer.Option(
            "--address",
            help="Local address to listen on; anything but loopback lets others on this "
            "network reach the job.",
        ),
    ] = "127.0.0.1",
) -> None:
    """Forward a local port to a port the job listens on: `port-forward 42 8888[:8888]`.

    Jupyter, TensorBoard, a debugger: one stream per connection, until Ctrl-C. Only the job's
    owner or an org admin of its org."""
    local, remote = parse_ports(ports)
    from cli.config import resolve

    with connect(f"port-forward {job}") as client:
        found = client.get(f"/v1/jobs/{job}")  # another org's job: the usual one-line 404
        me = client.get("/v1/users/me")
    if me.get("role") == "member" and found.get("user_id") != me.get("id"):
        # The server refuses it too (403); saying so now beats a refusal per connection.
        fail(
            f"port-forward {job}: forbidden: only the job's owner or an org admin may "
            "forward to it",
            EXIT_AUTH,
        )
    creds = resolve()
    assert creds is not None  # connect() has checked it

    def ready(port: int) -> None:
        typer.echo(f"Forwarding {address}:{port} -> job {job} port {remote} (Ctrl-C stops)")

    forwarder = Forwarder(creds, job, remote, rank)
    try:
        fatal = asyncio.run(forwarder.serve(address, local, ready))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except OSError as exc:
        fail(f"cannot listen on {address}:{local}: {exc.strerror or exc}")
    if fatal is not None:
        report(fatal, f"port-forward {job}", server=creds.server)


def stream_url(server: str, job: str, remote: int, rank: int, session: str) -> str:
    """`session`: this run's id, so that its connections make one event on the job."""
    base = server.rstrip("/")
    scheme, _, rest = base.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    query = f"port={remote}&rank={rank}&session={session}"
    return f"{ws_scheme}://{rest}{FORWARD_PATH.format(job=job)}?{query}"


class Forwarder:
    """Accepts local connections and gives each one a stream of its own."""

    def __init__(self, creds: Credentials, job: str, remote: int, rank: int) -> None:
        self.creds = creds
        self.job = job
        self.url = stream_url(creds.server, job, remote, rank, secrets.token_hex(8))
        self.fatal: ApiError | None = None
        self._stop: asyncio.Event | None = None

    async def serve(
        self, address: str, local: int, ready: Callable[[int], None]
    ) -> ApiError | None:
        """Until a fatal refusal (returned) or cancellation."""
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, address, local, limit=MAX_FRAME_BYTES)
        ready(server.sockets[0].getsockname()[1])
        async with server:
            await self._stop.wait()
        return self.fatal

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from protocol.tcpstream import splice

        try:
            websocket = await self._open_when_admitted()
        except ApiError as exc:
            if exc.status in FATAL_STATUSES and self._stop is not None:
                self.fatal = exc
                self._stop.set()
            else:
                _say(f"port-forward {self.job}: {exc.detail}")
            writer.close()
            return
        except Exception as exc:
            _say(f"port-forward {self.job}: cannot open a stream to {self.creds.server}: {exc}")
            writer.close()
            return
        async with websocket:
            error = await splice(websocket, reader, writer)
        if error:
            _say(f"port-forward {self.job}: {error}")

    async def _open_when_admitted(self) -> ClientConnection:
        """The stream; a 429 (too many streams at once) is waited as the server says, up to
        CONNECTION_PATIENCE_S for this connection, with one line each."""
        patience_s = CONNECTION_PATIENCE_S
        while True:
            try:
                return await self.open()
            except ApiError as exc:
                if exc.status != 429 or exc.retry_after_s is None or patience_s <= 0:
                    raise
                delay = min(max(exc.retry_after_s, 0.1), patience_s)
                patience_s -= delay
                _say(f"port-forward {self.job}: {exc.detail}; retrying in {delay:g} s")
                await asyncio.sleep(delay)

    async def open(self) -> ClientConnection:
        """The stream; ApiError for the server's refusal (404, 403, 409...)."""
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import InvalidStatus

        from cli.client import _tls

        try:
            return await ws_connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self.creds.token}"},
                user_agent_header="fairgpu-cli",
                max_size=MAX_FRAME_BYTES,
                compression=None,
                open_timeout=30,
                ssl=_tls(self.creds) if self.url.startswith("wss:") else None,
            )
        except InvalidStatus as exc:
            response = exc.response
            retry_after = retry_after_of(response.headers.get("Retry-After"))
            raise refusal(response.status_code, bytes(response.body or b""), retry_after) from None


def refusal(status: int, body: bytes, retry_after_s: float | None = None) -> ApiError:
    """The server's problem answer to a handshake, as the CLI's other errors."""
    try:
        problem: Any = json.loads(body)
        detail = str(problem.get("detail") or problem.get("title"))
    except (ValueError, AttributeError):
        problem, detail = None, f"the server refused the stream (HTTP {status})"
    return ApiError(status, detail, problem, retry_after_s)


def _say(line: str) -> None:
    typer.echo(f"fairgpu: {line}", err=True)
