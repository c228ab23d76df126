"""The HTTP server behind the agent's /metrics, bounded against the tasks that reach it.

Tasks in the node's network (gangs, container jobs: `--network host`) reach the metrics port
like any listener of the node, and tasks on other nodes reach it over the network. `wsgiref`'s
threading server gave every connection a thread of the agent's for as long as its peer kept it
open, token or not (the token is read with the request, which an idle connection never sends):
a task holding thousands of idle connections took that many of the agent's threads and
descriptors, none of it charged to the task, and with them the node's process table (32,768
pids on many kernels) or, under systemd, the agent unit's `TasksMax`, which every task of the
node shares. Here

- at most `MAX_SCRAPES` connections are served at once, and at most `MAX_SCRAPES_PER_PEER`
  from one peer, every address of the node itself (loopback, its interfaces) counting as one
  peer: the node's tasks share one small share, and a scraper elsewhere keeps its own;
- a connection past either bound is closed at once, never queued behind the others;
- a connection that sends nothing for `SCRAPE_IDLE_S` is closed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from socketserver import BaseRequestHandler, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import psutil

log = logging.getLogger(__name__)

MAX_SCRAPES = 16
"""Connections served at once: threads and descriptors of the agent's, whoever connects."""
MAX_SCRAPES_PER_PEER = 4
"""Of those, from one address; every address of the node counts as one (`NODE_PEER`)."""
SCRAPE_IDLE_S = 5.0
"""A connection that sends nothing for this long is closed (Prometheus sends its request at
once)."""
NODE_PEER = "node"
ADDRESS_REFRESH_S = 5.0
"""How long the node's own addresses are taken as read (interfaces come and go: veths, docker)."""


class NodeAddresses:
    """Tells the node's own addresses, where its tasks connect from, from other machines'."""

    def __init__(self) -> None:
        self._read_at = -ADDRESS_REFRESH_S
        self._addresses: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset()

    def peer(self, host: str) -> str:
        """`NODE_PEER` for any address of this node (a task can send from any of them, and
        from all of 127.0.0.0/8), else the address itself."""
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return host
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip in self._current():
            return NODE_PEER
        return str(ip)

    def _current(self) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        now = time.monotonic()
        if now - self._read_at >= ADDRESS_REFRESH_S:
            found = set()
            for entries in psutil.net_if_addrs().values():
                for entry in entries:
                    if entry.family in (socket.AF_INET, socket.AF_INET6):
                        try:
                            found.add(ipaddress.ip_address(entry.address.partition("%")[0]))
                        except ValueError:
                            continue
            self._addresses, self._read_at = frozenset(found), now
        return self._addresses


class QuietHandler(WSGIRequestHandler):
    """No line per request on stderr; an idle connection is closed after SCRAPE_IDLE_S."""

    timeout = SCRAPE_IDLE_S

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BoundedServer(ThreadingMixIn, WSGIServer):
    """wsgiref's threading server with at most `max_total` connections served at once and
    `max_per_peer` from one peer (NodeAddresses); one past either is closed at once."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseRequestHandler],
        *,
        max_total: int = MAX_SCRAPES,
        max_per_peer: int = MAX_SCRAPES_PER_PEER,
    ) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.node = NodeAddresses()
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._peer_of: dict[int, str] = {}
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Called in the accepting thread for every connection; False closes it at once."""
        peer = self.node.peer(str(client_address[0]))
        with self._lock:
            held = self._held.get(peer, 0)
            if len(self._peer_of) >= self.max_total or held >= self.max_per_peer:
                return False
            self._held[peer] = held + 1
            self._peer_of[id(request)] = peer
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its place is free again
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that went silent (SCRAPE_IDLE_S) or away: nothing for the agent's log."""
        log.debug("metrics connection from %s ended: an error", client_address, exc_info=True)

    def _release(self, request: Any) -> None:
        with self._lock:
            peer = self._peer_of.pop(id(request), None)
            if peer is None:
                return
            left = self._held[peer] - 1
            if left:
                self._held[peer] = left
            else:
                del self._held[peer]
