"""The agent over TLS to the real server (uvicorn on loopback, certificates made with openssl),
mutual TLS, and plain http:// refused to other machines by the agent and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agents.client import AgentClient, AuthError, ServerUnavailable
from api.app import create_app
from cli.main import app as cli_app
from protocol.agent import AgentRegister
from protocol.transport import plain_http_refusal, tls_context
from scheduler.settings import Settings
from tests.harness.served import seed_admin, serve_app


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-subj", "/CN=fairgpu test CA", "-days", "1", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=node-1")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", subject, cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def serve_tls(database_url: str, pki: Pki, *, require_client_cert: bool) -> Iterator[str]:
    app = create_app(Settings(database_url=database_url, migrate_on_start=False))
    with serve_app(
        app,
        ssl_certfile=str(pki.server_cert),
        ssl_keyfile=str(pki.server_key),
        ssl_ca_certs=str(pki.ca) if require_client_cert else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE,
    ) as url:
        yield url


@pytest.fixture
def tls_url(database_url: str, pki: Pki) -> Iterator[str]:
    yield from serve_tls(database_url, pki, require_client_cert=False)


@pytest.fixture
def mtls_url(database_url: str, pki: Pki) -> Iterator[str]:
    yield from serve_tls(database_url, pki, require_client_cert=True)


BODY = AgentRegister(
    name="n1", site="dc1", domain="r1", hostname="n1", address="127.0.0.1",
    agent_version="test", gpus=[],
)  # fmt: skip


async def register(url: str, tls: ssl.SSLContext | None, privileged: bool = False) -> None:
    client = AgentClient(url, tls=tls, timeout_s=5, privileged_source_port=privileged)
    assert client.privileged_source_port is privileged
    try:
        await client.register("fg_j_not-a-real-token", BODY)
    finally:
        await client.aclose()


# privileged: through agents/srcport.py's backend (a root agent's), from a port below 1024.
PRIVILEGED = pytest.mark.parametrize("privileged", [False, True], ids=["ephemeral", "privileged"])


@PRIVILEGED
def test_the_agent_checks_the_servers_certificate_against_its_ca(
    tls_url: str, pki: Pki, privileged: bool
) -> None:
    ours = tls_context(ca_file=pki.ca, client_cert=None, client_key=None)
    with pytest.raises(AuthError):  # TLS held; the server read the request and refused the token
        asyncio.run(register(tls_url, ours, privileged))
    with pytest.raises(ServerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(register(tls_url, None, privileged))  # the system CAs do not know the test CA


@PRIVILEGED
def test_mutual_tls_needs_the_nodes_certificate(mtls_url: str, pki: Pki, privileged: bool) -> None:
    anonymous = tls_context(ca_file=pki.ca, client_cert=None, client_key=None)
    with pytest.raises(ServerUnavailable):
        asyncio.run(register(mtls_url, anonymous, privileged))
    node = tls_context(ca_file=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    with pytest.raises(AuthError):
        asyncio.run(register(mtls_url, node, privileged))


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://127.0.0.1:8080", False),
        ("http://127.9.9.9", False),
        ("http://[::1]:8080", False),
        ("http://localhost:8080", False),
        ("https://gpu.example.org", False),
        ("http://gpu.example.org", True),
        ("http://10.0.0.5:8080", True),
    ],
)
def test_plain_http_is_refused_to_other_machines(url: str, refused: bool) -> None:
    assert (plain_http_refusal(url) is not None) is refused


def test_the_agent_refuses_plain_http_to_another_machine(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["agent", "--server", "http://gpu.example.org", "--isolation", "none",
         "--state-dir", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "refusing to send credentials over plain http:// to gpu.example.org" in result.output


def test_the_cli_checks_the_servers_certificate_against_its_ca_file(
    tls_url: str, pki: Pki, tmp_path: Path
) -> None:
    env = {"FAIRGPU_SERVER": tls_url, "FAIRGPU_TOKEN": "fg_u_not-a-real-token",
           "FAIRGPU_CONFIG_DIR": str(tmp_path)}  # fmt: skip
    unknown_ca = CliRunner().invoke(cli_app, ["whoami"], env=env)
    assert unknown_ca.exit_code == 3, unknown_ca.output
    assert "CERTIFICATE_VERIFY_FAILED" in unknown_ca.output
    # TLS held: the server read the request and refused the token.
    trusted = CliRunner().invoke(cli_app, ["whoami"], env={**env, "FAIRGPU_CA_FILE": str(pki.ca)})
    assert trusted.exit_code == 4, trusted.output
    missing = CliRunner().invoke(
        cli_app, ["whoami"], env={**env, "FAIRGPU_CA_FILE": str(tmp_path / "none.pem")}
    )
    assert missing.exit_code == 2
    assert "cannot load the TLS files" in missing.output
    assert "Traceback" not in missing.output


def test_login_saves_the_ca_file_the_commands_after_it_use(
    database_url: str, tls_url: str, pki: Pki, tmp_path: Path
) -> None:
    token = seed_admin(database_url)
    env = {"FAIRGPU_SERVER": None, "FAIRGPU_TOKEN": None, "FAIRGPU_CONFIG_DIR": str(tmp_path)}
    login = ["login", "--server", tls_url, "--token", token]
    unknown_ca = CliRunner().invoke(cli_app, login, env=env)
    assert unknown_ca.exit_code == 3, unknown_ca.output
    logged = CliRunner().invoke(cli_app, [*login, "--ca-file", str(pki.ca)], env=env)
    assert logged.exit_code == 0, logged.output
    assert "as root (platform-admin)" in logged.stdout
    who = CliRunner().invoke(cli_app, ["whoami"], env=env)
    assert who.exit_code == 0, who.output
    assert who.stdout.startswith("root (platform-admin)")


def test_the_cli_presents_its_certificate_to_a_mutual_tls_server(
    mtls_url: str, pki: Pki, tmp_path: Path
) -> None:
    env = {"FAIRGPU_SERVER": mtls_url, "FAIRGPU_TOKEN": "fg_u_not-a-real-token",
           "FAIRGPU_CONFIG_DIR": str(tmp_path), "FAIRGPU_CA_FILE": str(pki.ca)}  # fmt: skip
    anonymous = CliRunner().invoke(cli_app, ["whoami"], env=env)
    assert anonymous.exit_code == 3, anonymous.output
    ours = {"FAIRGPU_CLIENT_CERT": str(pki.client_cert), "FAIRGPU_CLIENT_KEY": str(pki.client_key)}
    known = CliRunner().invoke(cli_app, ["whoami"], env={**env, **ours})
    assert known.exit_code == 4, known.output


@contextmanager
def connect_proxy() -> Iterator[tuple[str, list[str]]]:
    """An HTTP proxy that serves CONNECT only: it records the request line and its
    Proxy-Authorization, then relays bytes both ways (TLS runs end to end through it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []
    relayed: list[socket.socket] = []  # closed on the way out (left open, the garbage collector
    # closed them in whichever later test ran then, which failed on its ResourceWarning)

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            relayed.append(client)
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(4096)
            lines = head.decode().split("\r\n")
            auth = [line for line in lines if line.lower().startswith("proxy-authorization:")]
            seen.append(" ".join([*lines[0].split()[:2], *auth]))  # not the HTTP version
            host, port = lines[0].split()[1].rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            relayed.append(upstream)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://user:secret@127.0.0.1:{listener.getsockname()[1]}", seen
    finally:
        listener.close()
        thread.join(timeout=5)
        for relay in relayed:
            with contextlib.suppress(OSError):
                relay.shutdown(socket.SHUT_RDWR)  # wakes a pipe blocked in recv
            relay.close()


def test_the_cli_reaches_an_https_server_through_a_connect_proxy(
    tls_url: str, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect_proxy() as (proxy, seen):
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        env = {"FAIRGPU_SERVER": tls_url, "FAIRGPU_TOKEN": "fg_u_not-a-real-token",
               "FAIRGPU_CONFIG_DIR": str(tmp_path), "FAIRGPU_CA_FILE": str(pki.ca)}  # fmt: skip
        result = CliRunner().invoke(cli_app, ["whoami"], env=env)
    assert result.exit_code == 4, result.output  # TLS through the tunnel; the token refused
    host_port = tls_url.removeprefix("https://")
    assert seen == [f"CONNECT {host_port} Proxy-Authorization: Basic dXNlcjpzZWNyZXQ="]
