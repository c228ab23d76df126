"""The CLI's HTTP connection (cli/connection.py) against real servers on loopback: uvicorn for
keep-alive and idle closes, a socket server that drops a request for resending, and a recording
proxy for http_proxy / no_proxy."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.client import Client
from cli.config import Credentials
from cli.connection import Connection, TransportError, bypasses_proxy, proxy_for
from cli.main import app as cli_app
from tests.harness.served import serve_app


async def where_from(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that answers with the client's port (which connection asked) and the body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    reply = {
        "port": scope["client"][1],
        "path": scope["path"],
        "query": scope["query_string"].decode(),
    }
    reply["body"] = body.decode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": json.dumps(reply).encode()})


@pytest.fixture
def url() -> Iterator[str]:
    with serve_app(where_from, timeout_keep_alive=1) as served:
        yield served


def test_requests_share_one_kept_alive_connection(url: str) -> None:
    conn = Connection(url, environ={})
    first = conn.request("GET", "/a", params={"state": ["PENDING", "RUNNING"], "mine": True})
    second = conn.request("POST", "/b", json_body={"x": 1})
    assert first.json()["port"] == second.json()["port"]
    assert first.json()["query"] == "state=PENDING&state=RUNNING&mine=true"
    assert json.loads(second.json()["body"]) == {"x": 1}
    conn.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_before_sending(url: str) -> None:
    conn = Connection(url, environ={})
    before = conn.request("GET", "/a").json()["port"]
    # uvicorn closes idle connections after timeout_keep_alive=1: wait until it has (the
    # socket reads as ready at its end), however late a loaded machine runs its timer.
    sock = conn._conn.sock if conn._conn is not None else None
    assert sock is not None
    deadline = time.monotonic() + 30
    while not select.select([sock], [], [], 0.1)[0]:
        assert time.monotonic() < deadline, "the server kept the idle connection open"
    after = conn.request("POST", "/b", json_body={}).json()["port"]
    assert after != before
    conn.close()


@dataclass
class Dropper:
    """A keep-alive HTTP server that answers each connection's first request and drops its
    second unanswered: the race of a server closing a connection as the client reuses it."""

    sock: socket.socket = field(default_factory=socket.socket)
    seen: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as reader:  # the socket closes once both do
                for answered in (True, False):
                    line = reader.readline().decode().strip()
                    if not line:
                        break
                    self.seen.append(line)
                    length = 0
                    while (header := reader.readline()) not in (b"\r\n", b""):
                        name, _, value = header.decode().partition(":")
                        if name.lower() == "content-length":
                            length = int(value)
                    reader.read(length)
                    if answered:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


@contextmanager
def dropper() -> Iterator[Dropper]:
    server = Dropper()
    server.sock.bind(("127.0.0.1", 0))
    server.sock.listen()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.sock.close()
        thread.join(timeout=5)


def test_a_get_is_sent_again_once_after_a_dropped_connection_and_a_post_never() -> None:
    with dropper() as server:
        conn = Connection(server.url, environ={})
        conn.request("GET", "/one")
        assert conn.request("GET", "/two").status == 200  # dropped, then resent on a new one
        assert server.seen == ["GET /one HTTP/1.1", "GET /two HTTP/1.1", "GET /two HTTP/1.1"]
        with pytest.raises(TransportError, match="connection closed"):
            conn.request("POST", "/jobs", json_body={})
        assert server.seen[3:] == ["POST /jobs HTTP/1.1"]
        conn.close()


@contextmanager
def recording_proxy() -> Iterator[tuple[str, list[str]]]:
    """A plain HTTP proxy that answers every request itself (401) and records its request line
    and Host header: it stands in for the remote server behind it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(f"{self.command} {self.path} Host={self.headers['Host']}")
            body = json.dumps({"title": "Unauthorized", "detail": "bad token"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_cli_refuses_plain_http_unless_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"FAIRGPU_SERVER": "http://gpu.example.org", "FAIRGPU_TOKEN": "fg_u_x",
           "FAIRGPU_CONFIG_DIR": str(tmp_path)}  # fmt: skip
    refused = CliRunner().invoke(cli_app, ["whoami"], env=env)
    assert refused.exit_code == 2
    assert "use https://, or pass --insecure" in refused.output
    # Asked for: the request goes out, here to a proxy that answers for the remote server.
    with recording_proxy() as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        allowed = CliRunner().invoke(cli_app, ["whoami"], env={**env, "FAIRGPU_INSECURE": "1"})
    assert allowed.exit_code == 4, allowed.output
    assert "not authenticated: bad token" in allowed.output
    assert seen == ["GET http://gpu.example.org/v1/users/me Host=gpu.example.org"]


def test_requests_go_through_the_proxy_the_environment_names() -> None:
    with recording_proxy() as (proxy, seen):
        conn = Connection("http://gpu.example.org:8080/api", environ={"HTTP_PROXY": proxy})
        reply = conn.request("GET", "/v1/users/me")
        assert reply.status == 401
        assert seen == ["GET http://gpu.example.org:8080/api/v1/users/me Host=gpu.example.org:8080"]
        conn.close()


@pytest.mark.parametrize(
    ("url", "no_proxy", "bypassed"),
    [
        ("http://gpu.example.org", "", False),
        ("http://gpu.example.org", "*", True),
        ("http://gpu.example.org", "other.org, example.org", True),
        ("http://gpu.example.org", ".example.org", True),
        ("http://gpu.example.org", "pu.example.org", False),
        ("http://gpu.example.org:8080", "gpu.example.org:9090", False),
        ("http://gpu.example.org:8080", "gpu.example.org:8080", True),
        ("http://10.1.2.3", "10.0.0.0/8", True),
        ("http://[::1]:8080", "::1", True),
    ],
)
def test_no_proxy_names_hosts_domains_ports_and_networks(
    url: str, no_proxy: str, bypassed: bool
) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert bypasses_proxy(parts.hostname or "", parts.port or 80, no_proxy) is bypassed
    env = {"http_proxy": "http://user:p%40ss@proxy.local:3128", "NO_PROXY": no_proxy}
    chosen = proxy_for(url, env)
    assert (chosen is None) is bypassed
    if chosen is not None:
        assert (chosen.host, chosen.port) == ("proxy.local", 3128)
        assert chosen.authorization == "Basic dXNlcjpwQHNz"  # user:p@ss


def test_a_proxy_other_than_plain_http_is_refused_in_one_line() -> None:
    with pytest.raises(TransportError, match="only http:// proxies"):
        proxy_for("https://gpu.example.org", {"HTTPS_PROXY": "socks5://127.0.0.1:1080"})


async def pager(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A listing of five items in pages of two: the cursor is the next item's index."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    query = dict(
        part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part
    )
    start = int(query.get("cursor", "0"))
    page: dict[str, Any] = {"data": [{"id": i} for i in range(start, min(start + 2, 5))]}
    if start + 2 < 5:
        page["next_cursor"] = str(start + 2)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": json.dumps(page).encode()})


def test_a_listing_in_pages_is_read_whole() -> None:
    """`node list`, `user list` and `token list` follow the cursor to the last page."""
    with serve_app(pager) as url, Client(Credentials(server=url, token="t")) as client:
        assert client.get_all("/v1/tokens") == [{"id": i} for i in range(5)]
