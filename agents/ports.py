"""Which TCP port a job may be forwarded to: only one that the job's own processes listen on.

Jobs of different orgs share their node's network namespace, so "port 8888 on the node" may be
another tenant's notebook. Before the agent connects a forward, it reads the listening sockets
of that port from /proc/net/tcp and /proc/net/tcp6 (the agent's own namespace, which its tasks
share) and the socket inodes that the task's processes hold (/proc/PID/fd). Every listener on
the port must be the task's: a second one (another job's, bound with SO_REUSEPORT) could be
handed the connection by the kernel. The check runs again once connected, so that a listener
that closed and was replaced while the agent connected is not trusted either.

The refusal says the same thing whether nothing listens on the port or somebody else does: a
tenant may not learn from it which ports other jobs use.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from agents import srcport

PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


class PortRefused(Exception):
    """The forward may not be connected; the message is the line the user sees."""


@dataclass(frozen=True, slots=True)
class TaskProcesses:
    """What a forward needs of a running task: its job (for the messages) and its pids."""

    job_id: int
    pids: Callable[[], set[int]]
    """Called at connect time: the task's processes then (its cgroup's, or its session's)."""
    netns: Path | None = None
    """The task's own network namespace (agents/netns.py); None: the node's."""


@dataclass(frozen=True, slots=True)
class Listener:
    address: str
    """The bound address as text (`0.0.0.0`, `::`, `127.0.0.1`...)."""
    port: int
    inode: int


def _address(hex_address: str) -> str:
    """/proc/net/tcp's address: 4 bytes (IPv4) or 16 (IPv6), each 32-bit word in host order."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def listeners(port: int, net: Path = PROC / "net") -> list[Listener]:
    """The sockets listening on `port` in the network namespace whose /proc/net is `net`
    (/proc/net: the agent's; /proc/thread-self/net: the calling thread's), IPv4 and IPv6."""
    found: list[Listener] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (net / table).read_text().splitlines()[1:]
        except FileNotFoundError:  # a kernel without IPv6
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            hex_address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port:
                found.append(Listener(_address(hex_address), port, int(fields[9])))
    return found


def socket_inodes(pids: Iterable[int], proc: Path = PROC) -> set[int]:
    """The inodes of the sockets these processes hold open (those that vanish are skipped)."""
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd_dir / fd)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    return inodes


def process_tree(leader: int) -> set[int]:
    """A task's processes without a cgroup (`--isolation none`): the leader, its descendants,
    and whatever still runs in its session (a daemon that forked away from its parent)."""
    pids: set[int] = set()
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(leader)
        pids = {leader, *(child.pid for child in root.children(recursive=True))}
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == leader:
                pids.add(pid)
    return pids


def _reachable(address: str) -> str | None:
    """Where to connect for a listener bound to `address`: a wildcard is reached on loopback;
    None for an address of no interface of this network namespace. Any uid may listen on
    another machine's address (IP_FREEBIND), and connecting there reaches that machine, not
    the task: as root, from a port below 1024, which NFS's `secure` exports trust."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip in _local_addresses():
        return str(ip)
    return None


def _local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of this thread's network namespace (getifaddrs asks its netlink)."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.ip_address(entry.address.partition("%")[0]))
    return found


def _owned(port: int, pids: set[int], job_id: int, proc: Path, net: Path) -> list[Listener]:
    found = listeners(port, net)
    if not found or not {entry.inode for entry in found} <= socket_inodes(pids, proc):
        raise PortRefused(f"nothing in job {job_id} listens on port {port}")
    return found


def connect_owned(
    port: int,
    pids: Iterable[int],
    *,
    job_id: int,
    timeout_s: float = 10.0,
    proc: Path = PROC,
    net: Path | None = None,
    privileged_source: bool = False,
) -> socket.socket:
    """A connected socket to `port`, provided every listener on it belongs to `pids` before
    and after connecting; PortRefused otherwise (or when the connection fails). Run in the
    task's network namespace with `net` its /proc/net when the task has one of its own.
    `privileged_source`: from a port tasks cannot hold (agents/srcport.py; a root agent in the
    node's network, which a task may have filled)."""
    task = set(pids)
    net = net if net is not None else proc / "net"
    if not 0 < port < 65536:
        raise PortRefused(f"port {port} is not a TCP port")
    before = _owned(port, task, job_id, proc, net)
    target = _reachable(before[0].address)
    if target is None:  # the same words as for a port nobody of the job listens on
        raise PortRefused(f"nothing in job {job_id} listens on port {port}")
    try:
        if privileged_source:
            conn = srcport.connect_sync((target, port), timeout_s=timeout_s)
        else:
            conn = socket.create_connection((target, port), timeout=timeout_s)
    except OSError as exc:
        raise PortRefused(f"port {port} of job {job_id} refused the connection: {exc}") from exc
    try:
        after = _owned(port, task, job_id, proc, net)
        if {entry.inode for entry in before} != {entry.inode for entry in after}:
            raise PortRefused(f"nothing in job {job_id} listens on port {port}")
    except PortRefused:
        conn.close()
        raise
    conn.settimeout(None)
    return conn
