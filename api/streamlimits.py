"""What a user's WebSocket stream (`attach`, `port-forward`) must pass once its caller is known.

Every stream costs the server a database read and write (who may, the event), a coroutine and
memory while it waits for the node's agent (up to 15 s) and while it relays, and it wakes the
node's long polls. Before authentication, api/admission.py bounds each token's rate; here,
after it and before the job is looked up:

- **Rates** (token buckets): per user over all their tokens (`stream_rate_per_s` /
  `stream_burst`), then per org over all its users (`org_stream_rate_per_s` /
  `org_stream_burst`): one org's flood empties its own bucket, never another org's. Per server
  process: a rate held across processes would cost a write on a shared row per opening.
- **This process's streams** (`max_streams_per_process`): the users' sides it holds, of all
  orgs together, so that the sum of orgs, each within its own bounds, cannot take the process's
  memory or file descriptors; and apart (so that a full process still takes the node sides its
  users wait for) as many nodes' sides it carries.

The bounds on open and pending streams per user, per org and per job count the stream rows of
every process (services/streamrows.py `open_row`). Past any bound: 429 with Retry-After
(api/routers/streams.py `deny`). Platform admins count as users, not against an org.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

from api.admission import TokenBuckets
from scheduler.services.errors import TooManyRequests
from scheduler.services.streamrows import StreamCaps
from scheduler.settings import Settings

Side = Literal["user", "node"]


def _too_many(what: str, retry_after_s: float, **extra: int | float) -> TooManyRequests:
    retry_after = max(1, math.ceil(retry_after_s))
    return TooManyRequests(
        f"{what}; retry after {retry_after} s", retry_after_s=retry_after, **extra
    )


class StreamLimits:
    """Kept on `app.state.stream_limits`."""

    def __init__(self, settings: Settings) -> None:
        self.users = TokenBuckets(settings.stream_rate_per_s, settings.stream_burst)
        self.orgs = TokenBuckets(settings.org_stream_rate_per_s, settings.org_stream_burst)
        self.caps = StreamCaps(
            open_per_user=settings.max_streams_per_user,
            open_per_org=settings.max_streams_per_org,
            pending_per_user=settings.max_pending_streams_per_user,
            pending_per_job=settings.max_pending_streams_per_job,
        )
        self.max_held = settings.max_streams_per_process
        self.held: dict[Side, int] = {"user": 0, "node": 0}

    def charge(self, *, user_id: int, org_id: int | None) -> None:
        """One stream's place in the user's rate, then the org's; TooManyRequests past one."""
        wait_s = self.users.take(f"user:{user_id}")
        if wait_s > 0:
            raise _too_many(
                f"more than {self.users.rate_per_s:g} streams per second (bursts of "
                f"{self.users.burst:g}) from this user",
                wait_s,
                rate_per_s=self.users.rate_per_s,
                burst=int(self.users.burst),
            )
        if org_id is None:
            return
        wait_s = self.orgs.take(f"org:{org_id}")
        if wait_s > 0:
            raise _too_many(
                f"more than {self.orgs.rate_per_s:g} streams per second (bursts of "
                f"{self.orgs.burst:g}) from the users of this org",
                wait_s,
                rate_per_s=self.orgs.rate_per_s,
                burst=int(self.orgs.burst),
            )

    @contextlib.contextmanager
    def slot(self, side: Side) -> Iterator[None]:
        """One of this process's streams (a user's side, or a node's side it carries), held
        while it lives; TooManyRequests when the process holds `max_streams_per_process` of
        that side already."""
        held = self.held[side]
        if held >= self.max_held:
            raise _too_many(
                f"this server process holds {held} {side} sides of streams, the most it may "
                "hold at once (of every org together)",
                1,
                limit=self.max_held,
            )
        self.held[side] = held + 1
        try:
            yield
        finally:
            self.held[side] -= 1
