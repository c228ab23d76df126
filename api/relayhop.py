"""The hop between server processes: an agent's stream that reached a process other than the
one holding the user's side is relayed to that one (docs/INTERACTIVE.md, "Several server
replicas").

The claiming process connects to the holder's `WS /v1/relay/streams/{id}` at the URL the
stream's row names, with the secret it chose when it claimed the stream (the row keeps only
its hash), then carries frames both ways, one in flight per direction, as every relay does;
it meters its side of the hop (api/streammetrics.py: hops, bytes carried) as the holder meters
the stream.
When the holder cannot be reached, the agent's handshake is refused (502): the agent logs it
and the stream ends; the user's side, if its process still lives, ends at its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING

from fastapi import WebSocket
from starlette.websockets import WebSocketState

from api.streammetrics import HopMeter
from protocol.streams import MAX_FRAME_BYTES
from scheduler.services.errors import DomainError
from scheduler.services.streams import Claim

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

log = logging.getLogger(__name__)

RELAY_PATH = "/v1/relay/streams/{stream_id}"
CONNECT_TIMEOUT_S = 10.0


class HolderUnreachable(DomainError):
    status = 502
    title = "Bad gateway"


def hop_url(holder_url: str, stream_id: str) -> str:
    """ws(s)://HOST:PORT/v1/relay/streams/ID for the holder's http(s)://HOST:PORT."""
    scheme, _, rest = holder_url.rstrip("/").partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}{RELAY_PATH.format(stream_id=stream_id)}"


async def connect_holder(claim: Claim) -> ClientConnection:
    """The hop to the process that holds the user's side (502 when it cannot be reached)."""
    from websockets.asyncio.client import connect  # only a process that hops needs it
    from websockets.exceptions import InvalidHandshake

    url = hop_url(claim.holder_url, claim.stream_id)
    try:
        return await connect(
            url,
            additional_headers={"Authorization": f"Bearer {claim.relay_secret}"},
            max_size=MAX_FRAME_BYTES,
            compression=None,
            open_timeout=CONNECT_TIMEOUT_S,
            ssl=ssl.create_default_context() if url.startswith("wss:") else None,
        )
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        log.warning("stream %s: its holder %s is unreachable: %r", claim.stream_id[:8], url, exc)
        raise HolderUnreachable(
            "the server process holding the user's side of this stream cannot be reached"
        ) from None


async def carry(agent: WebSocket, holder: ClientConnection, kind: str) -> None:
    """Frames both ways between the agent's side and the hop, until either ends."""
    async with holder:
        await agent.accept()
        meter = HopMeter(kind)

        async def agent_to_holder() -> None:
            while True:
                message = await agent.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if (data := message.get("bytes")) is not None:
                    meter.from_job(len(data))
                    await holder.send(data)
                elif (text := message.get("text")) is not None:
                    await holder.send(text)

        async def holder_to_agent() -> None:
            async for message in holder:
                if isinstance(message, bytes):
                    meter.to_job(len(message))
                    await agent.send_bytes(message)
                else:
                    await agent.send_text(message)

        pumps = {asyncio.create_task(agent_to_holder()), asyncio.create_task(holder_to_agent())}
        try:
            with meter:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    with contextlib.suppress(Exception):
        if agent.application_state is WebSocketState.CONNECTED:
            await agent.close()
