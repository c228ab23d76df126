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
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self._in_head = False
        self._head_bytes = 0  # of the URL and the fields handed over so far
        self._head_read_bytes = 0  # of the reads that arrived wholly inside the head
        self._header_count = 0
        self._head_refused: str | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._head_read_bytes = self._header_count = 0

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
        if self.transport.is_closing():
            return
        path = self.url.split(b"?", 1)[0][:200].decode("latin-1")
        payload = json.dumps(problem_body(431, why, path)).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            + b"content-type: "
            + PROBLEM_MEDIA_TYPE.encode()
            + b"\r\ncontent-length: "
            + str(len(payload)).encode()
            + b"\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head + payload)
        self.transport.close()


def bounded_http(
    max_head_bytes: int = MAX_REQUEST_HEAD_BYTES, max_headers: int = MAX_REQUEST_HEADERS
) -> type[asyncio.Protocol]:
    """The protocol for `uvicorn.Config(http=...)`: a partial of a module-level class, so that
    the config still pickles to `--workers` processes."""
    bound: Any = partial(
        BoundedHttpToolsProtocol, max_head_bytes=max_head_bytes, max_headers=max_headers
    )
    return bound  # type: ignore[no-any-return]
