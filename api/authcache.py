"""A short-lived, per-process memory of authenticated tokens.

Every request authenticates, and at hundreds of requests a second the token lookup is a large
share of the work. A principal is remembered for `auth_cache_ttl_s` (2 s by default): a token
revoked, or a user disabled, through this process is forgotten at once; through another replica
it stops working within the TTL. Set the TTL to 0 to look every token up every time.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.deps import Principal

MAX_ENTRIES = 50_000


class AuthCache:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal, datetime | None]] = {}

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
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (time.monotonic(), principal, expires_at)

    def clear(self) -> None:
        """Forget everything: after a revocation or a user change in this process."""
        self._entries.clear()
