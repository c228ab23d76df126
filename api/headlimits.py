"""Bounds on a request's head (request line and header fields), enforced while it is parsed.

httptools (llhttp) accepts a header of any length and any number of headers, and uvicorn keeps
them all: one client could make the shared server hold megabytes per connection and spend its
CPU on tens of thousands of fields before any route or token check runs. This protocol is
uvicorn's httptools protocol with two limits, as web servers set them (Apache's
`LimitRequestFields` 100, nginx's large header buffers): past either, the answer is a 431
problem and the connection closes.

The bytes are counted twice, because httptools hands over a field only once it is whole: the
fields and URL it has handed over, and every read that arrives while the head is still open
(so that one endless field is cut off after the limit, not buffered until it ends).

Time is bounded too: a request must arrive whole, head and body, within `read_timeout_s` of
its first byte (the first request of a connection: of the connection's opening), or the answer
is a 408 problem and the connection closes. uvicorn bounds only the idle time between two
requests of a connection; a client sending nothing after connecting, or a head or a body a
byte at a time, held its connection (a socket, a parser, a task) for as long as it liked,
and enough of them took the server's sockets from everyone (slowloris). Once a request is
whole, the time the app takes (long polls, streams) is not counted.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.problems import PROBLEM_MEDIA_TYPE, problem_body

MAX_REQUEST_HEAD_BYTES = 64 * 1024
MAX_REQUEST_HEADERS = 100
REQUEST_READ_TIMEOUT_S = 60.0
FIELD_OVERHEAD_BYTES = 4  # ": " and CRLF, counted as they are on the wire


class HeadTooLarge(Exception):
    """Raised inside a parser callback: httptools stops parsing and uvicorn answers."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses an oversized head with 431."""

    def __init__(
        self,
        *args: Any,
        max_head_bytes: int = MAX_REQUEST_HEAD_BYTES,
        max_headers: int = MAX_REQUEST_HEADERS,
        read_timeout_s: float = REQUEST_READ_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.read_timeout_s = read_timeout_s
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading = False  # a request has begun and is not yet whole
        self._in_head = False
        self._head_bytes = 0  # of the URL and the fields handed over so far
        self._head_read_bytes = 0  # of the reads that arrived wholly inside the head
        self._header_count = 0
        self._head_refused: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._head_read_bytes = self._header_count = 0
        self._reading = True
        if self._read_timer is None:
            self._arm_read_timer()

    def on_message_complete(self) -> None:
        self._reading = False
        self._disarm_read_timer()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._reading = False
        self._disarm_read_timer()  # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade()

    def _arm_read_timer(self) -> None:
        self._disarm_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answered = cycle is not None and cycle.response_started
        if cycle is not None and not cycle.response_complete:
            # The app waiting for the rest of the body reads a disconnect; whatever it sends
            # from now on is dropped (uvicorn's cycle sends nothing once disconnected).
            cycle.disconnected = True
            cycle.message_event.set()
        if self._reading and not answered:
            why = f"the request did not arrive whole within {self.read_timeout_s:g} s"
            self._send_problem(408, b"Request Timeout", why)
        self.transport.close()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refuse_head(f"more than {self.max_headers} header fields")
        self._count(len(name) + len(value) + FIELD_OVERHEAD_BYTES)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        open_before = self._in_head
        super().data_received(data)
        if self._head_refused is None and open_before and self._in_head:
            # The whole read belongs to a head that began in an earlier one.
            self._head_read_bytes += len(data)
            if self._head_read_bytes > self.max_head_bytes:
                self._head_refused = self._too_long()
                self._send_431(self._head_refused)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, which is ours when a callback refused the head."""
        if self._head_refused is None:
            super().send_400_response(msg)
        else:
            self._send_431(self._head_refused)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._refuse_head(self._too_long())

    def _too_long(self) -> str:
        return f"the request line and header fields exceed {self.max_head_bytes} bytes"

    def _refuse_head(self, why: str) -> None:
        self._head_refused = why
        raise HeadTooLarge(why)

    def _send_431(self, why: str) -> None:
        self._send_problem(431, b"Request Header Fields Too Large", why)

    def _send_problem(self, status: int, phrase: bytes, why: str) -> None:
        if self.transport.is_closing():
            return
        path = self.url.split(b"?", 1)[0][:200].decode("latin-1")
        payload = json.dumps(problem_body(status, why, path)).encode()
        head = (
            b"HTTP/1.1 "
            + str(status).encode()
            + b" "
            + phrase
            + b"\r\n"
            + b"content-type: "
            + PROBLEM_MEDIA_TYPE.encode()
            + b"\r\ncontent-length: "
            + str(len(payload)).encode()
            + b"\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head + payload)
        self.transport.close()


def bounded_http(
    max_head_bytes: int = MAX_REQUEST_HEAD_BYTES,
    max_headers: int = MAX_REQUEST_HEADERS,
    read_timeout_s: float = REQUEST_READ_TIMEOUT_S,
) -> type[asyncio.Protocol]:
    """The protocol for `uvicorn.Config(http=...)`: a partial of a module-level class, so that
    the config still pickles to `--workers` processes."""
    bound: Any = partial(
        BoundedHttpToolsProtocol,
        max_head_bytes=max_head_bytes,
        max_headers=max_headers,
        read_timeout_s=read_timeout_s,
    )
    return bound  # type: ignore[no-any-return]
