"""The agent's connections to its server leave from privileged source ports (agents/srcport.py),
so that a host-network task binding every ephemeral port of the node cannot cut it off.

The node-wide port sysctls are never changed here (other tests share the machine): the
exhaustion runs in a network namespace of its own (`unshare -n`), whose `ip_local_port_range`
and `ip_unprivileged_port_start` are its own, with a real HTTP server on its loopback, the
ports held by a process of an org's uid, and the real AgentClient.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agents.client import AgentClient
from agents.srcport import privileged_ports, proxied

ROOT = Path(__file__).resolve().parents[2]
HOLDER_UID = 2_900_000 + os.getpid() % 10_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1024\n", range(512, 1024)), ("300", range(1, 300)), ("0", range(0)), ("", range(0))],
)
def test_the_privileged_range_is_read_from_the_sysctl(
    tmp_path: Path, value: str, expected: range
) -> None:
    sysctl = tmp_path / "ip_unprivileged_port_start"
    sysctl.write_text(value)
    assert privileged_ports(sysctl) == expected
    assert privileged_ports(tmp_path / "missing") == range(0)


# Runs as root in a fresh network namespace: its sysctls are its own. An HTTP server on its
# loopback answers the agent's registration with 401: "reached" is the agent getting that far.
PRELUDE = r"""
import asyncio, ctypes, http.server, json, os, socket, sys, threading, time
import httpx
from agents.client import AgentClient, AuthError, ServerUnavailable
from protocol.agent import AgentRegister

HOLDER_UID = int(sys.argv[1])
EPHEMERAL = range(40000, 40010)
os.system("ip link set lo up")
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write(f"{EPHEMERAL.start} {EPHEMERAL.stop - 1}")
peers = []

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        peers.append(self.client_address[1])
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"detail": "bad join token"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()

def hold(ports, uid=None, kind=socket.SOCK_STREAM):
    # A process (as `uid`: an org's task) binding `ports`; returns it and what it could not bind.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: it ends with the probe, however that ends
        if uid is not None:
            os.setgroups([]); os.setgid(uid); os.setuid(uid)
        held, refused = [], []
        for port in ports:
            s = socket.socket(socket.AF_INET, kind)
            try:
                s.bind(("0.0.0.0", port)); held.append(s)
            except OSError as exc:
                refused.append(type(exc).__name__)
        os.write(write, json.dumps(refused).encode() + b"\n")
        time.sleep(600)
        os._exit(0)
    os.close(write)
    return pid, json.loads(os.fdopen(read).readline())

BODY = AgentRegister(name="n1", site="dc1", domain="r1", hostname="n1", address="127.0.0.1",
                     agent_version="0", gpus=[])

async def register(privileged, url="http://127.0.0.1:8080"):
    client = AgentClient(url, timeout_s=5, privileged_source_port=privileged)
    try:
        await client.register("bad", BODY)
    except AuthError:
        return "reached"
    except ServerUnavailable as exc:
        return f"unavailable: {exc}"
    finally:
        await client.aclose()

"""

PROBE = (
    PRELUDE
    + r"""
out = {}
task, out["task_refused"] = hold([*EPHEMERAL, 1000, 1023], uid=HOLDER_UID)
out["task_uid"] = HOLDER_UID
out["plain"] = asyncio.run(register(False))
try:
    socket.create_connection(("127.0.0.1", 8080), timeout=5).close()
    out["connect"] = "connected"
except OSError as exc:
    out["connect"] = exc.errno
out["privileged"] = asyncio.run(register(True))
# A port-forward's connection to a task's port (here the probe's own listener).
from agents.ports import PortRefused, connect_owned
for privileged in (False, True):
    try:
        connect_owned(8080, [os.getpid()], job_id=1, privileged_source=privileged).close()
        out[f"forward_{privileged}"] = "connected"
    except PortRefused as exc:
        out[f"forward_{privileged}"] = str(exc)
out["privileged_peer"] = peers[-1] if peers else None
os.kill(task, 9); os.waitpid(task, 0)
# The privileged range itself full (root services hold it): the kernel's ports, as before.
with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as f:
    f.write("20")
services, out["services_refused"] = hold(range(1, 20))
out["fallback"] = asyncio.run(register(True))
out["fallback_peer"] = peers[-1] if peers else None
os.kill(services, 9); os.waitpid(services, 0)
server.shutdown(); server.server_close()
print(json.dumps(out))
"""
)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip for a network namespace of its own",
)
def test_the_agent_reaches_its_server_while_a_task_holds_every_ephemeral_port() -> None:
    done = subprocess.run(
        ["unshare", "-n", "--", sys.executable, "-c", PROBE, str(HOLDER_UID)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # The task (an org's uid, no capabilities) bound the whole ephemeral range, and none of
    # the privileged ports.
    assert out["task_refused"] == ["PermissionError", "PermissionError"]
    # Any connection from the kernel's ephemeral ports now fails: the hold works.
    assert out["plain"].startswith("unavailable:")
    assert out["connect"] == errno.EADDRNOTAVAIL
    # The agent's own connection, from a privileged port, reaches the server.
    assert out["privileged"] == "reached"
    assert 512 <= out["privileged_peer"] < 1024
    # So does a port-forward's connection to a task's listener, in the node's network.
    assert "Cannot assign requested address" in out["forward_False"]
    assert out["forward_True"] == "connected"
    # With every privileged port taken, it still connects, from an ephemeral one.
    assert out["services_refused"] == []
    assert out["fallback"] == "reached"
    assert 40000 <= out["fallback_peer"] < 40010


# The server by name, resolved by a DNS server on the namespace's loopback (the probe's mount
# namespace gives it its own /etc/resolv.conf); the task then holds the ephemeral UDP ports too.
DNS_PROBE = (
    PRELUDE
    + r"""
import struct
NAME = "fairgpu-server.test"
def answer(query):
    end = query.index(b"\0", 12) + 5
    qtype = struct.unpack("!H", query[end - 4 : end - 2])[0]
    head = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if qtype == 1 else 0, 0, 0)
    record = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
    return head + query[12:end] + (record if qtype == 1 else b"")
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))
def serve_dns():
    while True:
        query, peer = dns.recvfrom(512)
        dns.sendto(answer(query), peer)
threading.Thread(target=serve_dns, daemon=True).start()
url = f"http://{NAME}:8080"
out = {"resolved": asyncio.run(register(True, url))}
task, refused = hold(EPHEMERAL, uid=HOLDER_UID)
udp, udp_refused = hold(EPHEMERAL, uid=HOLDER_UID, kind=socket.SOCK_DGRAM)
out["refused"] = refused + udp_refused
try:
    socket.getaddrinfo(NAME, 8080)
    out["resolver"] = "resolved"
except OSError as exc:
    out["resolver"] = type(exc).__name__
out["cached"] = asyncio.run(register(True, url))
out["cached_peer"] = peers[-1] if peers else None
os.kill(task, 9); os.waitpid(task, 0); os.kill(udp, 9); os.waitpid(udp, 0)
server.shutdown(); server.server_close()
print(json.dumps(out))
"""
)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip for a network namespace of its own",
)
def test_the_agent_reaches_its_server_by_name_while_a_task_holds_the_resolvers_ports(
    tmp_path: Path,
) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = tmp_path / "probe.py"
    script.write_text(DNS_PROBE)
    done = subprocess.run(
        ["unshare", "-n", "-m", "--", "sh", "-c",
         'mount --bind "$1" /etc/resolv.conf && exec "$2" "$3" "$4"', "sh",
         str(resolv), sys.executable, str(script), str(HOLDER_UID)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["resolved"] == "reached"
    assert out["refused"] == []  # the task holds every ephemeral TCP and UDP port
    assert out["resolver"] == "gaierror"  # the node's resolver cannot send a query
    # The agent connects to the addresses it found last, from a privileged port.
    assert out["cached"] == "reached"
    assert 512 <= out["cached_peer"] < 1024


def test_behind_a_proxy_the_agent_connects_as_httpx_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment (HTTPS_PROXY, ALL_PROXY...) is reached as httpx reaches
    it, from an ephemeral port; a server the proxy is bypassed for keeps the privileged one."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = "https://fairgpu.example.org"
    assert not proxied(url)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    assert proxied(url)
    assert not proxied("http://fairgpu.example.org")  # no proxy for plain http here
    monkeypatch.setenv("NO_PROXY", "example.org")
    assert not proxied(url)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("ALL_PROXY", "http://proxy.example.org:3128")
    assert proxied("http://fairgpu.example.org")

    async def privileged(server: str) -> bool:
        client = AgentClient(server, privileged_source_port=True)
        await client.aclose()
        return client.privileged_source_port

    assert asyncio.run(privileged(url)) is False
    monkeypatch.setenv("NO_PROXY", "fairgpu.example.org")
    assert asyncio.run(privileged(url)) is True
