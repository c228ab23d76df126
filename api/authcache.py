"""A short-lived, per-process memory of authenticated tokens.

Every request authenticates, and at hundreds of requests a second the token lookup is a large
share of the work. A principal is remembered for `auth_cache_ttl_s` (2 s by default): a token
revoked, or a user disabled, through this process is forgotten at once; through another replica
it stops working within the TTL. Set the TTL to 0 to look every token up every time.

Apart from the TTL'd principals it keeps the digests of tokens that authenticated here (and
credentials this process issued), longer and without their principals: only the refusal of an
address for failed authentications (api/authfailures.py) reads them, to let a token it has
seen work pass while strangers' tokens from that address wait. A task spraying made-up tokens
from its node must not silence the node's own agent, nor one tenant behind a shared proxy the
others. It never decides who a token is: a vouched token is still looked up, and its first
401 forgets it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.deps import Principal

MAX_ENTRIES = 50_000
MAX_VOUCHED = 100_000
"""Digests of tokens seen to work (64 hex characters each, about 16 MB at most), least
recently used dropped first."""


class AuthCache:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal, datetime | None]] = {}
        self._vouched: OrderedDict[str, None] = OrderedDict()

    def get(self, digest: str, now: datetime) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(digest)
        if entry is None:
            return None
        cached_at, principal, expires_at = entry
        if time.monotonic() - cached_at > self.ttl_s or (
            expires_at is not None and expires_at <= now
        ):
            self._entries.pop(digest, None)
            return None
        return principal

    def put(self, digest: str, principal: Principal, expires_at: datetime | None) -> None:
        self.vouch(digest)
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (time.monotonic(), principal, expires_at)

    def clear(self) -> None:
        """Forget every principal: after a revocation or a user change in this process. The
        vouched digests stay: they decide nothing (a revoked one fails its next lookup)."""
        self._entries.clear()

    def vouch(self, digest: str) -> None:
        """`digest`'s token authenticated here, or this process issued it."""
        self._vouched[digest] = None
        self._vouched.move_to_end(digest)
        if len(self._vouched) > MAX_VOUCHED:
            self._vouched.popitem(last=False)

    def vouched(self, digest: str) -> bool:
        return digest in self._vouched

    def unvouch(self, digest: str) -> None:
        self._vouched.pop(digest, None)
