"""The agent's own connections to its server leave from privileged source ports.

A task in the node's network (`--network host`) shares the node's local ports with the agent:
by binding every port of `net.ipv4.ip_local_port_range` it leaves every `connect()` of the node
without a source port (EADDRNOTAVAIL), the agent's to its server among them, and the node goes
`down` for every org on it. Ports below `net.ipv4.ip_unprivileged_port_start` can be bound only
with CAP_NET_BIND_SERVICE in the network namespace's user namespace, which tasks never hold
(the sandbox drops to the task's uid; containers run with `--cap-drop=ALL`). So the agent, as
root, binds each of its connections to one of those ports itself, as `rresvport` and the NFS
client do, and a task cannot take them from it. The sysctl is read from the agent's own network
namespace (`/proc/sys`), never assumed: at 0 there is no privileged port, and the kernel's
choice is kept. The server's name resolves through UDP from an ephemeral port, which a task can
hold too: the last addresses found serve while resolving fails. When no port of the range is
free (other root services hold them) or the agent cannot bind one (not root), the connection
takes the kernel's ephemeral port as before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import ssl
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpcore
import httpx

# httpcore's stream over an anyio byte stream: TLS, reads and writes as its own backend does.
from httpcore._backends.anyio import AnyIOStream

log = logging.getLogger(__name__)

UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
RANGE_SIZE = 512
"""How many ports below the sysctl the agent may take: 512 to 1023 by default, rresvport's."""


def privileged_ports(sysctl: Path = UNPRIVILEGED_PORT_START) -> range:
    """The ports only a process with CAP_NET_BIND_SERVICE may bind in this network namespace,
    the top RANGE_SIZE of them (the well-known service ports below stay the services'); empty
    when the sysctl is 0 (anyone binds anything) or cannot be read."""
    try:
        start = int(sysctl.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(max(1, start - RANGE_SIZE), max(1, start))


class _NoPrivilegedPort(Exception):
    """No port of the range could be bound: the caller takes an ephemeral one."""


async def connect(
    host: str, port: int, *, timeout_s: float | None, ports: range | None = None
) -> socket.socket:
    """A TCP socket connected to host:port from a privileged source port where one is free,
    else from the kernel's ephemeral range. OSError as socket.create_connection raises it."""
    candidates = privileged_ports() if ports is None else ports
    async with asyncio.timeout(timeout_s):
        infos = await _resolve(host, port)
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            try:
                if candidates:
                    try:
                        return await _connect_from(family, kind, proto, address, candidates)
                    except _NoPrivilegedPort as exc:
                        log.warning("%s: connecting from an ephemeral port", exc)
                return await _connect_plain(family, kind, proto, address)
            except OSError as exc:
                last = exc
        raise last if last is not None else OSError(f"{host}: no address to connect to")


_Addresses = Sequence[tuple[int, int, int, str, Any]]
_resolved: dict[tuple[str, int], _Addresses] = {}


async def _resolve(host: str, port: int) -> _Addresses:
    """The server's addresses; the last ones found where resolving fails. A host-network task
    can hold every ephemeral UDP port as well, and then the resolver cannot send a query: the
    server's name must not be what cuts the node off."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        known = _resolved.get((host, port))
        if known is None:
            raise
        log.warning("cannot resolve %s (%s): connecting to its last addresses", host, exc)
        return known
    _resolved[(host, port)] = infos
    return infos


def _bound(family: int, kind: int, proto: int, source: int) -> socket.socket | None:
    """A socket bound to `source` (None: someone holds it); _NoPrivilegedPort where the agent
    may not bind it."""
    sock = socket.socket(family, kind, proto)
    try:
        # A service that later listens on this port with SO_REUSEADDR (most do) may still.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise _NoPrivilegedPort(f"the agent may not bind port {source}") from exc
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


def _shuffled(candidates: range) -> list[int]:
    order = list(candidates)
    random.shuffle(order)  # two agents' (or two connections') tries do not walk in step
    return order


def _all_taken(candidates: range) -> _NoPrivilegedPort:
    return _NoPrivilegedPort(
        f"every privileged port {candidates.start}-{candidates.stop - 1} is taken"
    )


async def _connect_from(
    family: int, kind: int, proto: int, address: Any, candidates: range
) -> socket.socket:
    loop = asyncio.get_running_loop()
    for source in _shuffled(candidates):
        sock = _bound(family, kind, proto, source)
        if sock is None:
            continue
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRNOTAVAIL:  # this port's last connection there lingers
                raise
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise _all_taken(candidates)


def connect_sync(
    address: tuple[str, int], *, timeout_s: float, ports: range | None = None
) -> socket.socket:
    """connect() for a thread and a numeric address (the agent's connection to a task's port
    for a port-forward): a task holding the node's ephemeral ports must not stop another
    org's forwards either."""
    candidates = privileged_ports() if ports is None else ports
    [(family, kind, proto, _, target), *_] = socket.getaddrinfo(
        *address, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )
    if candidates:
        try:
            for source in _shuffled(candidates):
                sock = _bound(family, kind, proto, source)
                if sock is None:
                    continue
                try:
                    sock.settimeout(timeout_s)
                    sock.connect(target)
                except OSError as exc:
                    sock.close()
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
                    continue
                return sock
            raise _all_taken(candidates)
        except _NoPrivilegedPort as exc:
            log.warning("%s: connecting from an ephemeral port", exc)
    return socket.create_connection(address, timeout=timeout_s)


async def _connect_plain(family: int, kind: int, proto: int, address: Any) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


class PrivilegedPortBackend(httpcore.AsyncNetworkBackend):
    """httpcore's anyio backend, with connect_tcp from a privileged source port (above)."""

    def __init__(self, ports: range | None = None) -> None:
        self._ports = ports
        self._anyio = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            sock = await connect(host, port, timeout_s=timeout, ports=self._ports)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in socket_options or ():
            sock.setsockopt(*option)
        stream = await anyio.abc.SocketStream.from_socket(sock)
        return AnyIOStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._anyio.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class PrivilegedPortTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with PrivilegedPortBackend under its connection pool."""

    def __init__(self, *, verify: ssl.SSLContext | bool, ports: range | None = None) -> None:
        super().__init__(verify=verify)
        ssl_context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context()
        limits = httpx.Limits()
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PrivilegedPortBackend(ports),
        )


def proxied(url: str) -> bool:
    """The environment sends connections to `url` through a proxy (HTTPS_PROXY, ALL_PROXY...):
    then the agent connects to the proxy as httpx does, from an ephemeral port."""
    parts = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    if not any(key in proxies for key in (parts.scheme, "all", "socks")):
        return False
    return not urllib.request.proxy_bypass(parts.host)
