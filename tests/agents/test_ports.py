"""The port-forward wall (agents/ports.py): a forward connects only to a port that the job's own
processes listen on, real listeners in real processes sharing the node's network namespace."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.ports import PortRefused, _address, connect_owned, listeners, process_tree

# Listens on ARGV[1] (0: any free port; "reuse": with SO_REUSEPORT), prints the port, then
# answers each connection with b"job:" + what it read until the peer's end of stream.
_SERVER = """
import socket, sys
host, port, reuse = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "reuse"
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if reuse:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind((host, port)); s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(b"job:" + data); c.close()
"""


def _serve(host: str = "127.0.0.1", port: int = 0, reuse: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _SERVER, host, str(port), "reuse" if reuse else "-"],
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def _listening(procs: list[subprocess.Popen[str]], *args: object) -> tuple[int, int]:
    proc = _serve(*args)  # type: ignore[arg-type]
    procs.append(proc)
    assert proc.stdout is not None
    return proc.pid, int(proc.stdout.readline())


def _roundtrip(conn: socket.socket, data: bytes) -> bytes:
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)  # half-close: the job still answers
    out = b""
    while chunk := conn.recv(65536):
        out += chunk
    conn.close()
    return out


def test_addresses_read_as_the_kernel_writes_them() -> None:
    assert _address("0100007F") == "127.0.0.1"
    assert _address("00000000") == "0.0.0.0"
    assert _address("00000000000000000000000001000000") == "::1"
    mapped = ipaddress.ip_address(_address("0000000000000000FFFF00000100007F"))
    assert mapped == ipaddress.ip_address("::ffff:127.0.0.1")


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::"])
def test_the_jobs_own_listener_is_connected(
    started: list[subprocess.Popen[str]], host: str
) -> None:
    pid, port = _listening(started, host)
    assert [entry.port for entry in listeners(port)] == [port]
    assert _roundtrip(connect_owned(port, {pid}, job_id=7), b"hello") == b"job:hello"


def test_another_jobs_port_is_refused_as_if_nothing_listened(
    started: list[subprocess.Popen[str]],
) -> None:
    mine, _ = _listening(started)
    _, theirs = _listening(started)
    with pytest.raises(PortRefused) as refused:
        connect_owned(theirs, {mine}, job_id=7)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    unused = free.getsockname()[1]
    free.close()
    with pytest.raises(PortRefused) as nothing:
        connect_owned(unused, {mine}, job_id=7)
    # One message for both: a tenant learns nothing of the ports other jobs use.
    assert str(refused.value) == f"nothing in job 7 listens on port {theirs}"
    assert str(nothing.value) == f"nothing in job 7 listens on port {unused}"


def test_a_second_listener_sharing_the_port_is_refused(
    started: list[subprocess.Popen[str]],
) -> None:
    """With SO_REUSEPORT the kernel could hand the forwarded connection to the other listener."""
    mine, port = _listening(started, "127.0.0.1", 0, True)
    _listening(started, "127.0.0.1", port, True)
    assert len(listeners(port)) == 2
    with pytest.raises(PortRefused, match="nothing in job 7 listens"):
        connect_owned(port, {mine}, job_id=7)


def test_out_of_range_ports_are_refused() -> None:
    for port in (0, 65536, -1):
        with pytest.raises(PortRefused, match="not a TCP port"):
            connect_owned(port, {1}, job_id=7)


def test_the_process_tree_holds_a_daemon_that_left_its_parent(tmp_path: Path) -> None:
    """Without a cgroup, a task's processes are its session: `nohup server &` from a shell
    that exits is still the task's."""
    pidfile = tmp_path / "pid"
    leader = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; exit 0"], start_new_session=True
    )
    leader.wait()
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    orphan = int(pidfile.read_text())
    try:
        assert orphan in process_tree(leader.pid)
        assert orphan not in process_tree(leader.pid + 1_000_000)
    finally:
        subprocess.run(["kill", str(orphan)], check=False)
