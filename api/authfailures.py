"""Failed authentications per client address, bounded before the token is looked up.

A made-up token costs the server an indexed lookup and starts with a full rate bucket of its
own, so a client spraying new ones is not bound by the per-token rates. Every answer 401 to a
request that carried a bearer token takes one from its address's bucket
(`auth_failure_rate_per_s` / `auth_failure_burst`); while that bucket is empty, the address's
requests with a bearer are 429 with Retry-After before any lookup (HTTP and WebSocket alike),
except a token this process has seen work (api/authcache.py `vouched`): the node's own agent
keeps its heartbeats while a task on that node sprays tokens, and users behind a proxy or NAT
that a hostile tenant shares keep working. A live token pays nothing here, however often it is
used; a vouched one that fails is forgotten and charged like any other.

The address is the connection's peer, unless that peer is one of `trusted_proxies`: then the
rightmost address of `X-Forwarded-For` that is not itself a trusted proxy (what a proxy that
appends to the header saw). IPv6 clients are counted per /64, the block one subscriber holds.
The buckets are at most `MAX_ADDRESSES`, the fullest dropped first (api/admission.py
`TokenBuckets`): a client cannot empty the memory nor refill its own bucket by spraying.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence

from starlette.types import Message, Receive, Scope, Send

from api.admission import TokenBuckets, bearer_secret, refuse
from api.authcache import AuthCache
from scheduler.services.tokens import hash_token

MAX_ADDRESSES = 100_000
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
DENIAL_STARTS = frozenset({"http.response.start", "websocket.http.response.start"})


def parse_proxies(text: str) -> tuple[Network, ...]:
    """`FAIRGPU_TRUSTED_PROXIES`: addresses or networks, separated by commas (ValueError)."""
    parts = filter(None, (part.strip() for part in text.split(",")))
    return tuple(ipaddress.ip_network(part, strict=False) for part in parts)


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_address(scope: Scope, proxies: Sequence[Network]) -> str:
    """The key of the client behind this request (see the module's docstring)."""
    client = scope.get("client")
    peer = _address(client[0]) if client else None
    if peer is None:
        return "unknown"
    if proxies and any(peer in network for network in proxies):
        forwarded = b",".join(
            value for name, value in scope["headers"] if name == b"x-forwarded-for"
        )
        for hop in reversed(forwarded.decode("latin-1").split(",")):
            address = _address(hop)
            if address is None:
                break  # what a client wrote itself: the last trusted hop is all we know
            peer = address
            if not any(address in network for network in proxies):
                break
    if isinstance(peer, ipaddress.IPv6Address):
        if peer.ipv4_mapped is not None:
            return str(peer.ipv4_mapped)
        return str(ipaddress.IPv6Network((peer, 64), strict=False))
    return str(peer)


def has_bearer(scope: Scope) -> bool:
    return any(name == b"authorization" for name, _ in scope["headers"])


def bearer_digest(scope: Scope) -> str:
    """The stored hash of the request's bearer token ("" when there is none or it is malformed)."""
    secret = bearer_secret(scope)
    return hash_token(secret) if secret is not None else ""


class AuthFailures:
    """Kept on the app (`FairgpuApp.auth_failures`)."""

    def __init__(self, rate_per_s: float, burst: int, proxies: Sequence[Network]) -> None:
        self.buckets = TokenBuckets(rate_per_s, burst, max_keys=MAX_ADDRESSES)
        self.proxies = tuple(proxies)

    def refused_for_s(self, address: str) -> float:
        """0 when the address may try a token; otherwise the seconds until it may."""
        return self.buckets.wait_s(address)

    def watch(self, address: str, send: Send, cache: AuthCache, scope: Scope) -> Send:
        """`send`, charging the address once (and forgetting the token) if the answer is 401."""

        async def watched(message: Message) -> None:
            if message["type"] in DENIAL_STARTS and message.get("status") == 401:
                self.buckets.take(address)
                cache.unvouch(bearer_digest(scope))
            await send(message)

        return watched


async def refuse_address(scope: Scope, receive: Receive, send: Send, wait_s: float) -> None:
    retry_after = max(1, math.ceil(wait_s))
    await refuse(
        scope,
        receive,
        send,
        429,
        "too many failed authentications (unknown, expired or revoked tokens) from this "
        f"address; retry after {retry_after} s",
        [(b"retry-after", str(retry_after).encode())],
        retry_after_s=retry_after,
    )
