"""What a user's WebSocket stream (`attach`, `port-forward`) must pass once its caller is known.

Every stream costs the server a database read and write (who may, the event), a coroutine and
memory while it waits for the node's agent (up to 15 s) and while it relays, and it wakes the
node's long polls. Before authentication, api/admission.py bounds each token's rate; here,
after it and before the job is looked up:

- **Rates** (token buckets): per user over all their tokens (`stream_rate_per_s` /
  `stream_burst`), then per org over all its users (`org_stream_rate_per_s` /
  `org_stream_burst`): one org's flood empties its own bucket, never another org's.
- **Open streams** (waiting or relaying): `max_streams_per_user`, `max_streams_per_org`.
- **Pending streams** (waiting for the agent): `max_pending_streams_per_user` and
  `max_pending_streams_per_job`.

Past any of them: 429 with Retry-After (api/routers/streams.py `deny`). All per server process.
Platform admins count as users, not against an org.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from api.admission import TokenBuckets
from scheduler.services.errors import TooManyRequests
from scheduler.settings import Settings


def _too_many(what: str, retry_after_s: float, **extra: int | float) -> TooManyRequests:
    retry_after = max(1, math.ceil(retry_after_s))
    return TooManyRequests(
        f"{what}; retry after {retry_after} s", retry_after_s=retry_after, **extra
    )


@dataclass(eq=False)
class Ticket:
    """One admitted stream: pending until `claimed` (its agent came, or it gave up)."""

    limits: StreamLimits
    user_id: int
    job_id: int
    pending: bool = field(default=True)

    def claimed(self) -> None:
        if self.pending:
            self.pending = False
            self.limits.pending_by_user[self.user_id] -= 1
            self.limits.pending_by_job[self.job_id] -= 1
            _prune(self.limits.pending_by_user, self.user_id)
            _prune(self.limits.pending_by_job, self.job_id)


def _prune(counts: Counter[int], key: int) -> None:
    if counts[key] <= 0:
        del counts[key]


class StreamLimits:
    """Kept on `app.state.stream_limits`."""

    def __init__(self, settings: Settings) -> None:
        self.users = TokenBuckets(settings.stream_rate_per_s, settings.stream_burst)
        self.orgs = TokenBuckets(settings.org_stream_rate_per_s, settings.org_stream_burst)
        self.max_per_user = settings.max_streams_per_user
        self.max_per_org = settings.max_streams_per_org
        self.max_pending_per_user = settings.max_pending_streams_per_user
        self.max_pending_per_job = settings.max_pending_streams_per_job
        self.open_by_user: Counter[int] = Counter()
        self.open_by_org: Counter[int] = Counter()
        self.pending_by_user: Counter[int] = Counter()
        self.pending_by_job: Counter[int] = Counter()

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
    def open(self, *, user_id: int, org_id: int | None, job_id: int) -> Iterator[Ticket]:
        """Held while the stream lives; TooManyRequests when a bound is reached already."""
        bounds = (
            (self.open_by_user[user_id], self.max_per_user, "streams of yours are open"),
            (self.pending_by_user[user_id], self.max_pending_per_user, "streams of yours wait "
             "for their node"),
            (self.pending_by_job[job_id], self.max_pending_per_job, f"streams into job {job_id} "
             "wait for its node"),
            (self.open_by_org[org_id] if org_id is not None else 0, self.max_per_org,
             "streams of your org are open"),
        )  # fmt: skip
        for held, limit, what in bounds:
            if held >= limit:
                raise _too_many(
                    f"{held} {what} on this server, the most allowed at once", 1, limit=limit
                )
        # No await between the checks and the counts: no other request can come between.
        self.open_by_user[user_id] += 1
        self.pending_by_user[user_id] += 1
        self.pending_by_job[job_id] += 1
        if org_id is not None:
            self.open_by_org[org_id] += 1
        ticket = Ticket(self, user_id, job_id)
        try:
            yield ticket
        finally:
            ticket.claimed()
            self.open_by_user[user_id] -= 1
            _prune(self.open_by_user, user_id)
            if org_id is not None:
                self.open_by_org[org_id] -= 1
                _prune(self.open_by_org, org_id)
