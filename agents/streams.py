"""The agent's side of terminal streams: a WebSocket to the server joined to a task's terminal.

The heartbeat reply asks for a stream (`HeartbeatReply.streams`); the agent opens
`WS /v1/agent/streams/{id}` outbound with its node credential (no port on the node listens) and
connects to the task's terminal host (agents/ptyhost.py) over its unix socket. Frames go through
one at a time each way, each awaited before the next is read: back-pressure from the terminal
to the user and back. See docs/INTERACTIVE.md and protocol/streams.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agents import ptyhost
from agents.forward import forward_port
from agents.ports import TaskProcesses
from protocol.agent import StreamOpen
from protocol.streams import (
    AGENT_STREAM_PATH,
    MAX_FRAME_BYTES,
    Error,
    Exit,
    Resize,
    Signal,
    control_text,
    parse_control,
)

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0
TERMINAL_WAIT_S = 5.0


def stream_url(server: str, stream_id: str) -> str:
    """ws(s)://... for the server's http(s)://... base URL."""
    base = server.rstrip("/")
    scheme, _, rest = base.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}{AGENT_STREAM_PATH.format(id=stream_id)}"


class Streams:
    """The agent's open streams; each id is opened once. `on_input(task_id)` hears of every
    byte (and signal) a client sends into a task: the idle timeout's clock (agents/idle.py)."""

    def __init__(
        self,
        server: str,
        tls: ssl.SSLContext | None = None,
        on_input: Callable[[int], None] | None = None,
    ) -> None:
        self.server = server
        self.tls = tls
        self.on_input = on_input
        self._seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def open(
        self,
        request: StreamOpen,
        credential: str,
        terminal: Path | None,
        processes: TaskProcesses | None = None,
    ) -> bool:
        """Open the stream in the background (`terminal`: the task's socket directory;
        `processes`: the task's, for a "port" stream, agents/forward.py); False when it was
        asked for before (a server repeats a stream until it is claimed)."""
        if request.id in self._seen:
            return False
        self._seen.add(request.id)
        task = asyncio.create_task(self._run(request, credential, terminal, processes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(
        self,
        request: StreamOpen,
        credential: str,
        terminal: Path | None,
        processes: TaskProcesses | None,
    ) -> None:
        from websockets.asyncio.client import connect  # only an agent that relays needs it

        url = stream_url(self.server, request.id)
        on_input = self.on_input
        task_id = request.task_id

        def used() -> None:
            if on_input is not None:
                on_input(task_id)

        try:
            async with connect(
                url,
                additional_headers={"Authorization": f"Bearer {credential}"},
                max_size=MAX_FRAME_BYTES,
                compression=None,
                open_timeout=CONNECT_TIMEOUT_S,
                ssl=self.tls if url.startswith("wss:") else None,
            ) as websocket:
                used()  # an attach, or a new forwarded connection, is someone using the task
                if request.kind == "port":
                    await forward_port(websocket, request.port, processes, task_id, used)
                    return
                if terminal is None:
                    await _refuse(websocket, f"task {request.task_id} has no terminal here")
                    return
                try:
                    reader, writer = await _connect_terminal(terminal)
                except OSError as exc:
                    await _refuse(websocket, f"the task's terminal is gone ({exc.strerror})")
                    return
                try:
                    await _relay(websocket, reader, writer, used)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except Exception as exc:  # one stream's failure must not reach the agent
            log.warning("stream %s for task %d: %r", request.id[:8], request.task_id, exc)


async def _connect_terminal(directory: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Through the directory's fd (a unix socket's path is limited to 108 bytes). A task that
    has just started may not be listening yet: its host gets TERMINAL_WAIT_S to begin."""
    deadline = asyncio.get_running_loop().time() + TERMINAL_WAIT_S
    while True:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        try:
            return await asyncio.open_unix_connection(
                f"/proc/self/fd/{dir_fd}/{ptyhost.SOCKET_NAME}", limit=MAX_FRAME_BYTES
            )
        except (FileNotFoundError, ConnectionRefusedError):
            if asyncio.get_running_loop().time() >= deadline:
                raise
        finally:
            os.close(dir_fd)
        await asyncio.sleep(0.05)


async def _refuse(websocket: ClientConnection, message: str) -> None:
    await websocket.send(control_text(Error(type="error", message=message)))


async def notify_terminal(directory: Path, text: str) -> bool:
    """Show `text` on every client of the task's terminal and in its log (not as the command's
    input); False when the terminal could not be reached."""
    try:
        _reader, writer = await _connect_terminal(directory)
    except OSError:
        return False
    try:
        writer.write(ptyhost.frame(ptyhost.FRAME_NOTICE, text.encode()))
        await writer.drain()
        return True
    except OSError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _relay(
    websocket: ClientConnection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    used: Callable[[], None],
) -> None:
    async def to_terminal() -> None:
        async for message in websocket:
            if isinstance(message, bytes):
                used()
                writer.write(ptyhost.frame(ptyhost.FRAME_DATA, message))
            else:
                control = parse_control(message)
                if isinstance(control, Resize):
                    size = struct.pack(">HH", min(control.rows, 65535), min(control.cols, 65535))
                    writer.write(ptyhost.frame(ptyhost.FRAME_RESIZE, size))
                elif isinstance(control, Signal):
                    used()
                    number = str(int(signal.Signals["SIG" + control.name])).encode()
                    writer.write(ptyhost.frame(ptyhost.FRAME_SIGNAL, number))
            await writer.drain()

    async def from_terminal() -> None:
        while True:
            try:
                header = await reader.readexactly(ptyhost.HEADER.size)
            except asyncio.IncompleteReadError:
                await _refuse(websocket, "the task's terminal closed without an exit status")
                return
            kind, length = ptyhost.HEADER.unpack(header)
            payload = await reader.readexactly(length)
            if kind == ptyhost.FRAME_DATA:
                for start in range(0, len(payload), MAX_FRAME_BYTES):
                    await websocket.send(payload[start : start + MAX_FRAME_BYTES])
            elif kind == ptyhost.FRAME_REFUSED:
                await _refuse(websocket, payload.decode(errors="replace")[:1024])
                return
            elif kind == ptyhost.FRAME_EXIT:
                code = max(0, min(255, int(payload)))
                await websocket.send(control_text(Exit(type="exit", code=code)))
                return

    pumps = {asyncio.create_task(to_terminal()), asyncio.create_task(from_terminal())}
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
