"""One forwarded TCP connection carried by one WebSocket stream: both of its ends (the CLI's
`port-forward` and the agent) splice the same way.

Binary frames carry the connection's bytes. `{"type": "eof"}` says the sender's side has shut
down its writing half (the peer then shuts down its own socket's writing half, as a TCP
half-close), so that a client that sends a request and then EOF still gets its answer. The
stream ends when both directions have reached end of stream or either side fails;
`{"type": "error"}` (the agent refusing the port, the server refusing the stream) ends it with
a reason. One frame is in flight per direction: a socket's read waits for the WebSocket's send
and a WebSocket's receive waits for the socket's drain, so a slow reader slows its writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol.streams import MAX_FRAME_BYTES, Eof, Error, control_text, parse_control

if TYPE_CHECKING:
    from websockets.asyncio.connection import Connection

EOF_TEXT = control_text(Eof(type="eof"))
CHUNK_BYTES = 64 * 1024
assert CHUNK_BYTES <= MAX_FRAME_BYTES


async def splice(
    websocket: Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    on_input: Callable[[], None] | None = None,
) -> str | None:
    """Relay until both directions end; the error message received, if any. `on_input` is
    called for every frame of bytes the stream brings (the agent's idle clock)."""
    error: list[str] = []

    async def socket_to_stream() -> None:
        while data := await reader.read(CHUNK_BYTES):
            await websocket.send(data)
        await websocket.send(EOF_TEXT)

    async def stream_to_socket() -> None:
        async for message in websocket:
            if isinstance(message, bytes):
                if on_input is not None:
                    on_input()
                writer.write(message)
                await writer.drain()
                continue
            control = parse_control(message)
            if isinstance(control, Eof):
                if writer.can_write_eof():
                    writer.write_eof()
                return
            if isinstance(control, Error):
                error.append(control.message)
                return

    upstream = asyncio.create_task(socket_to_stream())
    downstream = asyncio.create_task(stream_to_socket())
    pending = {upstream, downstream}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # One direction ended cleanly (a half-close): the other goes on. A failure, an
            # error message or a closed stream ends both.
            if error or websocket_closed(websocket) or any(t.exception() for t in done):
                break
    finally:
        for pump in (upstream, downstream):
            pump.cancel()
        await asyncio.gather(upstream, downstream, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return error[0] if error else None


def websocket_closed(websocket: Connection) -> bool:
    from websockets.protocol import State

    return websocket.state is not State.OPEN
