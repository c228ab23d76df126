"""Oversized request heads at the real `fairgpu server` (uvicorn, httptools) over a raw socket:
a megabyte header, twenty thousand headers or an endless header line is 431 problem JSON once
past the bound (api/headlimits.py), read no further, and the server keeps serving."""

from __future__ import annotations

import json
import select
import socket
from typing import Any
from urllib.parse import urlsplit

from api.headlimits import MAX_REQUEST_HEAD_BYTES, MAX_REQUEST_HEADERS
from tests.security.conftest import Live

PIECE_BYTES = 16 * 1024


def _exchange(live: Live, pieces: list[bytes]) -> tuple[bytes, int]:
    """Send `pieces` one after another, stopping as soon as the server answers or closes;
    the answer and how many bytes were sent."""
    parts = urlsplit(live.url)
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        for piece in pieces:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and _complete(answer):
                    break
        except ConnectionResetError:
            pass
    return answer, sent


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _split(data: bytes) -> list[bytes]:
    return [data[i : i + PIECE_BYTES] for i in range(0, len(data), PIECE_BYTES)]


def _head(live: Live, fields: list[bytes]) -> bytes:
    host = urlsplit(live.url).netloc.encode()
    token = live.tokens["member_a"].encode()
    lines = [b"GET /v1/jobs HTTP/1.1", b"Host: " + host, b"Authorization: Bearer " + token]
    return b"\r\n".join([*lines, *fields]) + b"\r\n\r\n"


def _problem_431(answer: bytes) -> dict[str, Any]:
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 431 "), answer[:300]
    head, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), head
    problem: dict[str, Any] = json.loads(body)
    assert problem["status"] == 431
    return problem


def _still_serving(live: Live) -> None:
    with live.client("member_a") as c:
        assert c.get("/v1/jobs").status_code == 200


def test_a_megabyte_header_is_431_and_not_read_to_its_end(live: Live) -> None:
    head = _head(live, [b"X-Big: " + b"a" * (1024 * 1024)])
    answer, sent = _exchange(live, _split(head))
    problem = _problem_431(answer)
    assert str(MAX_REQUEST_HEAD_BYTES) in problem["detail"]
    assert sent < len(head) // 2  # refused long before the header ended
    _still_serving(live)


def test_twenty_thousand_headers_are_431(live: Live) -> None:
    head = _head(live, [b"X-H%d: v" % i for i in range(20_000)])
    answer, _ = _exchange(live, _split(head))
    problem = _problem_431(answer)
    assert f"more than {MAX_REQUEST_HEADERS} header fields" in problem["detail"]
    _still_serving(live)


def test_a_long_url_is_431(live: Live) -> None:
    host = urlsplit(live.url).netloc.encode()
    head = b"GET /v1/jobs?x=" + b"a" * (512 * 1024) + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    answer, _ = _exchange(live, _split(head))
    _problem_431(answer)
    _still_serving(live)


def test_heads_within_the_bounds_are_served(live: Live) -> None:
    """The bounds leave room for what proxies and clients send: every allowed field, and a
    head just under the byte bound split across many reads."""
    count = MAX_REQUEST_HEADERS - 3  # Host, Authorization and one large field below
    fields = [b"X-H%d: v" % i for i in range(count - 1)]
    used = len(_head(live, fields))
    fields.append(b"X-Pad: " + b"p" * (MAX_REQUEST_HEAD_BYTES - used - 64))
    head = _head(live, fields)
    answer, sent = _exchange(live, [head[i : i + 1000] for i in range(0, len(head), 1000)])
    assert sent == len(head)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
