"""Slow clients at the real `fairgpu server` (uvicorn, httptools) over raw sockets: a
connection that sends nothing, a head or a body sent a byte at a time, is answered 408 (or
closed, when no request began) once FAIRGPU_REQUEST_READ_TIMEOUT_S has passed since its first
byte (api/headlimits.py), and the server serves everyone else meanwhile. What the app does
once a request is whole (a long poll) is not cut."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from scheduler.bench.procs import Fleet
from tests.security.conftest import FUZZ_ENV, Live, seed

READ_TIMEOUT_S = 2.0
DEADLINE_S = 60.0  # generous: the machine may be loaded


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    workdir = Path(tempfile.mkdtemp(prefix="fairgpu-slow-"))
    fleet = Fleet(workdir=workdir, database_url=f"sqlite:///{workdir / 'fairgpu.db'}")
    try:
        admin = fleet.bootstrap()
        env = {**FUZZ_ENV, "FAIRGPU_REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S)}
        live = Live(url=fleet.server(**env), fleet=fleet)
        seed(live, admin)
        yield live
    finally:
        fleet.close()


def _connect(live: Live) -> socket.socket:
    parts = urlsplit(live.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=DEADLINE_S)


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    started = time.monotonic()
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection past {DEADLINE_S} s: {answer!r}")
    return answer, time.monotonic() - started


def _problem(answer: bytes, status: int) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"connection: close" in head.lower()
    problem: dict[str, object] = json.loads(body)
    assert problem["status"] == status
    return problem


def _served(live: Live) -> None:
    with live.client("member_b") as c:
        assert c.get("/v1/users/me").status_code == 200


def test_a_connection_that_sends_nothing_is_closed(live: Live) -> None:
    with _connect(live) as sock:
        _served(live)
        answer, took = _read_until_closed(sock)
    assert answer == b""
    assert took >= READ_TIMEOUT_S * 0.5


def test_a_head_sent_slowly_is_408(live: Live) -> None:
    host = urlsplit(live.url).netloc.encode()
    with _connect(live) as sock:
        sock.sendall(b"GET /v1/users/me HTTP/1.1\r\nHost: " + host + b"\r\nX-Slow: a")
        _served(live)
        answer, _ = _read_until_closed(sock)
    assert "within 2 s" in str(_problem(answer, 408)["detail"])


def test_a_body_sent_slowly_is_408_and_stores_nothing(live: Live) -> None:
    host = urlsplit(live.url).netloc.encode()
    token = live.tokens["member_a"].encode()
    body = json.dumps({"name": "slow", "command": ["true"], "time_limit": 60}).encode()
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: Bearer " + token
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n"
    )  # fmt: skip
    with _connect(live) as sock:
        sock.sendall(head + body[:10])
        _served(live)
        answer, _ = _read_until_closed(sock)
    _problem(answer, 408)
    with live.client("member_a") as c:
        names = [j["name"] for j in c.get("/v1/jobs").json()["data"]]
    assert "slow" not in names


def test_a_long_poll_outlives_the_read_timeout(live: Live) -> None:
    """A request that arrived whole is not cut however long its answer takes."""
    job = live.ids["job_member_a"]
    with live.client("member_a") as c:
        started = time.monotonic()
        r = c.get(f"/v1/jobs/{job}/logs", params={"wait_s": READ_TIMEOUT_S * 2})
        took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert (r.json()["data"], r.json()["eof"]) == ("", False)  # its task never runs
    assert took >= READ_TIMEOUT_S * 1.5


def test_keep_alive_requests_each_get_their_own_time(live: Live) -> None:
    """Three requests on one connection, spread over more than the timeout, are all served."""
    with httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {live.tokens['member_b']}"}
    ) as c:
        for _ in range(3):
            assert c.get("/v1/users/me").status_code == 200
            time.sleep(READ_TIMEOUT_S * 0.75)  # under uvicorn's keep-alive of 5 s
