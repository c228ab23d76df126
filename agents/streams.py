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
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agents import ptyhost, srcport
from agents.forward import forward_port
from agents.ports import TaskProcesses
from agents.shells import ShellOpener, ShellRefused
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
NEW_SHELL_WAIT_S = 15.0
"""A new shell's host has just been started: it may take longer to listen on a busy node."""


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
        *,
        privileged_source_port: bool = False,
    ) -> None:
        self.server = server
        self.tls = tls
        self.privileged_source_port = privileged_source_port
        self.on_input = on_input
        self._seen: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def open(
        self,
        request: StreamOpen,
        credential: str,
        terminal: Path | None,
        processes: TaskProcesses | None = None,
        shell: ShellOpener | None = None,
    ) -> bool:
        """Open the stream in the background (`terminal`: the task's socket directory;
        `processes`: the task's, for a "port" stream, agents/forward.py; `shell`: what opens
        a new shell in the task, for a "new" one, agents/shells.py); False when it was asked
        for before (a server repeats a stream until it is claimed)."""
        if request.id in self._seen:
            return False
        self._seen.add(request.id)
        task = asyncio.create_task(self._run(request, credential, terminal, processes, shell))
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
        shell: ShellOpener | None,
    ) -> None:
        from websockets.asyncio.client import connect  # only an agent that relays needs it

        url = stream_url(self.server, request.id)
        on_input = self.on_input
        task_id = request.task_id

        def used() -> None:
            if on_input is not None:
                on_input(task_id)

        try:
            sock = await self._socket(url)
            async with connect(
                url,
                additional_headers={"Authorization": f"Bearer {credential}"},
                max_size=MAX_FRAME_BYTES,
                compression=None,
                open_timeout=CONNECT_TIMEOUT_S,
                ssl=self.tls if url.startswith("wss:") else None,
                sock=sock,
            ) as websocket:
                used()  # an attach, or a new forwarded connection, is someone using the task
                if request.kind == "port":
                    await forward_port(websocket, request.port, processes, task_id, used)
                elif request.kind == "new":
                    await _new_shell(websocket, shell, task_id, used)
                elif terminal is None:
                    await _refuse(websocket, f"task {request.task_id} has no terminal here")
                else:
                    await _to_terminal(websocket, terminal, used)
        except Exception as exc:  # one stream's failure must not reach the agent
            log.warning("stream %s for task %d: %r", request.id[:8], request.task_id, exc)

    async def _socket(self, url: str) -> socket.socket | None:
        """The stream's connection from a privileged source port, as the heartbeat's
        (agents/srcport.py); None: websockets connects (through a proxy, where one is set)."""
        if not self.privileged_source_port or srcport.proxied(self.server):
            return None
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        return await srcport.connect(parts.hostname or "", port, timeout_s=CONNECT_TIMEOUT_S)


async def _to_terminal(
    websocket: ClientConnection, directory: Path, used: Callable[[], None], wait_s: float = 0
) -> None:
    """Relay between the stream and the terminal host listening in `directory`."""
    try:
        reader, writer = await _connect_terminal(directory, wait_s or TERMINAL_WAIT_S)
    except OSError as exc:
        await _refuse(websocket, f"the task's terminal is gone ({exc.strerror})")
        return
    try:
        await _relay(websocket, reader, writer, used)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _new_shell(
    websocket: ClientConnection,
    shell: ShellOpener | None,
    task_id: int,
    used: Callable[[], None],
) -> None:
    """A new shell in the task's sandbox on a terminal of its own, relayed until it ends (it
    ends with this stream: its host hangs it up once its one client has gone)."""
    if shell is None:
        await _refuse(websocket, f"task {task_id} is not running on this node")
        return
    try:
        opened = await shell()
    except (ShellRefused, OSError) as exc:
        await _refuse(websocket, f"cannot open a shell in task {task_id}: {exc}")
        return
    try:
        await _to_terminal(websocket, opened.directory, used, wait_s=NEW_SHELL_WAIT_S)
    finally:
        await opened.close()


async def _connect_terminal(
    directory: Path, wait_s: float = TERMINAL_WAIT_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Through the directory's fd (a unix socket's path is limited to 108 bytes). A task that
    has just started may not be listening yet: its host gets `wait_s` to begin."""
    deadline = asyncio.get_running_loop().time() + wait_s
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
