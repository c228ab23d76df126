"""What a request must pass before its body is read: the agent protocol's bearer, and the
per-token rate limits on submissions, heartbeats and every other change.

`FairgpuApp.__call__` asks `Admission.admit` first, before the direct routes and FastAPI,
so that both paths are bound alike and a refused request costs no body read:

- A URL with a NUL character (in its path or, as `%00`, its query) is 400.

- The agent protocol accepts bodies up to 32 MiB (api/limits.py). A request to `/v1/agent/*`
  without a bearer is 401 at once; one whose body may exceed the ordinary 1 MiB (a larger or
  missing Content-Length) has its bearer checked first (one indexed read), and is 401 unless it
  is a live agent or join token (403 for another live token). Ordinary heartbeats are small,
  so they pay nothing here and the route authenticates them as before.
- A token bucket per token (by its hash) for `POST /v1/jobs`, for `POST /v1/agent/heartbeat`,
  for every other change under `/v1/` (PATCH, cancel, hold, release, tokens, users, orgs) and
  for every read (GET under `/v1/` but the agent protocol):
  `submit_rate_per_s`/`submit_burst`, `heartbeat_rate_per_s`/`heartbeat_burst`,
  `change_rate_per_s`/`change_burst` and `read_rate_per_s`/`read_burst`; past it, 429 with
  Retry-After. Every read, submission and change also pays, once authenticated, into its
  user's bucket (the token's rate, over all the user's tokens) and its org's
  (`org_read_*`, `org_submit_*`, `org_change_*`): `charge_user`, so that neither a user's
  tokens nor an org's users multiply what one tenant may load onto the server. An array of N
  jobs pays for the other N - 1 (up to the burst) once its body is read
  (`charge_submissions`). The
  buckets live in this process: each server process (each worker of `fairgpu server --workers
  N`, each replica) keeps its own, so a client spread over N processes may reach N times the
  rate.

- A token bucket per token for opening WebSocket streams (`attach`, `port-forward`:
  `stream_rate_per_s`/`stream_burst`; a node's side of a stream, `/v1/agent/streams/*`, in a
  bucket of its own: `agent_stream_rate_per_s`/`agent_stream_burst`), before the token is
  looked up; past it, 429 with Retry-After as the handshake's answer (a close with code 1013
  and the sentence as its reason where the server cannot answer a handshake with a response
  of its own). The user's and org's bounds follow authentication (api/streamlimits.py).

`Admission.follows` and `Admission.org_follows` bound another kind of load after
authentication: the log reads one user, and all users of one org, hold open while they wait
for output (`GET /v1/jobs/{id}/logs?wait_s=`), each of which reads the database twice a
second; the org's bound keeps an org admin from multiplying the user's by the org's users.
Also per process.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import Receive, Scope, Send

from api.deps import ADMITTED_AT, parse_bearer
from api.limits import AGENT_PREFIX, CHANGE_METHODS, JOBS_PATH, MAX_BODY_BYTES, UserCharge
from api.problems import PROBLEM_MEDIA_TYPE, RETRY_AFTER_S, WEBSOCKET_DENIAL, problem_body
from scheduler.db.types import utcnow
from scheduler.services.errors import TooManyRequests
from scheduler.services.tokens import find_valid_token, hash_token
from scheduler.settings import Settings
from scheduler.states import TokenKind

HEARTBEAT_PATH = "/v1/agent/heartbeat"
AGENT_TASKS_PREFIX = "/v1/agent/tasks/"  # an agent's reads about its tasks (job-gpu-use)
MAX_BUCKETS = 100_000  # tokens remembered per kind of request before the fullest are dropped
AGENT_KINDS = frozenset({TokenKind.AGENT, TokenKind.JOIN})
USER_CHARGES: dict[UserCharge, str] = {
    "reads": "reads (GET)",
    "submissions": "submissions",
    "changes": "changes (POST, PATCH, PUT, DELETE)",
}


class TokenBuckets:
    """`rate_per_s` requests per second per key on average, `burst` at once; 0 rate: no limit.

    A key's bucket starts full. The buckets are taken before authentication, so anyone can add
    keys: past `max_keys` the fullest half is dropped (a full bucket remembers nothing, and a key
    sprayed once is nearly full), never the drained ones, so that a client cannot refill its
    own bucket by spraying made-up tokens.
    """

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = MAX_BUCKETS) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens left, when counted]

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float | None = None, cost: float = 1.0) -> float:
        """0 when the request may go (and `cost` is taken); otherwise the seconds until it may.
        A cost above the burst could never be paid: it is taken as the burst."""
        if self.rate_per_s <= 0:
            return 0.0
        cost = min(cost, self.burst)
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
        bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return 0.0
        bucket[0] = tokens
        return (cost - tokens) / self.rate_per_s

    def wait_s(self, key: str, now: float | None = None) -> float:
        """The seconds until `key` could take one (0: now), taking nothing; a key never seen
        is full and is not remembered."""
        bucket = self._buckets.get(key)
        if self.rate_per_s <= 0 or bucket is None:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s

    def _prune(self, now: float) -> None:
        def level(item: tuple[str, list[float]]) -> float:
            tokens, at = item[1]
            return min(self.burst, tokens + (now - at) * self.rate_per_s)

        emptiest = sorted(self._buckets.items(), key=level)[: self.max_keys // 2]
        self._buckets = dict(emptiest)


class OpenRequests:
    """At most `limit` requests held open at once per key (a user id, an org id); `whose`
    names the key's holder in the refusal."""

    def __init__(self, limit: int, what: str, whose: str = "one user") -> None:
        self.limit = limit
        self.what = what
        self.whose = whose
        self._open: dict[int, int] = {}

    def held(self, key: int) -> int:
        return self._open.get(key, 0)

    @contextlib.contextmanager
    def slot(self, key: int) -> Iterator[None]:
        """Held while the request runs; TooManyRequests when `key` holds `limit` already."""
        held = self._open.get(key, 0)
        if held >= self.limit:
            raise TooManyRequests(
                f"{held} {self.what} are open on this server, the most {self.whose} may "
                "hold at once; wait for one to end (or read without waiting)",
                limit=self.limit,
                retry_after_s=1,
            )
        self._open[key] = held + 1
        try:
            yield
        finally:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]


async def _refuse(
    send: Send, status: int, detail: str, path: str, headers: list[Any], **extra: Any
) -> None:
    """A problem answered without reading the body; the connection closes with it, so that the
    unread body is never taken for the next request."""
    payload = json.dumps(problem_body(status, detail, path, **extra)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


CLOSE_TRY_AGAIN_LATER = 1013
MAX_CLOSE_REASON_BYTES = 123


async def _refuse_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    headers: list[Any],
    **extra: Any,
) -> None:
    """A problem as the handshake's answer; without the server's denial extension, a close
    (1013 for a 429, else 1008) whose reason is the sentence, clipped to what a close carries."""
    await receive()  # websocket.connect
    if WEBSOCKET_DENIAL in (scope.get("extensions") or {}):
        payload = json.dumps(problem_body(status, detail, scope["path"], **extra)).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                    (b"content-length", str(len(payload)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": payload})
        return
    reason = detail.encode()[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
    await send({"type": "websocket.accept"})
    code = CLOSE_TRY_AGAIN_LATER if status == 429 else 1008
    await send({"type": "websocket.close", "code": code, "reason": reason})


async def refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    headers: list[Any],
    **extra: Any,
) -> None:
    """A problem answered before the request is read, on HTTP or as a WebSocket handshake's."""
    if scope["type"] == "websocket":
        await _refuse_websocket(scope, receive, send, status, detail, headers, **extra)
    else:
        await _refuse(send, status, detail, scope["path"], headers, **extra)


def bearer_secret(scope: Scope) -> str | None:
    """The secret of the request's `Authorization: Bearer` header; None when absent or malformed."""
    authorization, _ = _headers(scope)
    return parse_bearer(authorization.decode("latin-1"))


def _headers(scope: Scope) -> tuple[bytes, bytes | None]:
    authorization = b""
    length: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"content-length":
            length = value
    return authorization, length


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.submits = TokenBuckets(settings.submit_rate_per_s, settings.submit_burst)
        self.heartbeats = TokenBuckets(settings.heartbeat_rate_per_s, settings.heartbeat_burst)
        self.changes = TokenBuckets(settings.change_rate_per_s, settings.change_burst)
        self.reads = TokenBuckets(settings.read_rate_per_s, settings.read_burst)
        # Once the token is known: per user (the token's rate) and per org, for each kind.
        self.per_user = {
            "reads": TokenBuckets(settings.read_rate_per_s, settings.read_burst),
            "submissions": TokenBuckets(settings.submit_rate_per_s, settings.submit_burst),
            "changes": TokenBuckets(settings.change_rate_per_s, settings.change_burst),
        }
        self.per_org = {
            "reads": TokenBuckets(settings.org_read_rate_per_s, settings.org_read_burst),
            "submissions": TokenBuckets(settings.org_submit_rate_per_s, settings.org_submit_burst),
            "changes": TokenBuckets(settings.org_change_rate_per_s, settings.org_change_burst),
        }
        self.follows = OpenRequests(settings.max_log_follows_per_user, "waiting log reads of yours")
        self.org_follows = OpenRequests(
            settings.max_log_follows_per_org, "waiting log reads of your org", "one org"
        )
        self.streams = TokenBuckets(settings.stream_rate_per_s, settings.stream_burst)
        self.agent_streams = TokenBuckets(
            settings.agent_stream_rate_per_s, settings.agent_stream_burst
        )

    async def admit_websocket(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """True: go on. False: the handshake was refused (400 or 429)."""
        path: str = scope["path"]
        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            await _refuse_websocket(scope, receive, send, 400, "a URL must not contain NUL "
                                    "characters", [])  # fmt: skip
            return False
        secret = bearer_secret(scope)
        if secret is None:
            return True  # the route answers 401 without looking anything up
        buckets = self.agent_streams if path.startswith(AGENT_PREFIX) else self.streams
        wait_s = buckets.take(hash_token(secret))
        if wait_s <= 0:
            return True
        retry_after = max(1, math.ceil(wait_s))
        await _refuse_websocket(
            scope,
            receive,
            send,
            429,
            f"more than {buckets.rate_per_s:g} streams per second (bursts of "
            f"{buckets.burst:g}) from this token; retry after {retry_after} s",
            [(b"retry-after", str(retry_after).encode())],
            rate_per_s=buckets.rate_per_s,
            burst=int(buckets.burst),
            retry_after_s=retry_after,
        )
        return False

    def _buckets(self, method: str, path: str) -> tuple[TokenBuckets, str] | None:
        """The rate a request counts against, and what the refusal calls it."""
        if method == "POST" and path == JOBS_PATH:
            return self.submits, "submissions"
        if method == "POST" and path == HEARTBEAT_PATH:
            return self.heartbeats, "heartbeats"
        if method == "GET" and path.startswith(AGENT_TASKS_PREFIX):  # counted as heartbeats
            return self.heartbeats, "heartbeats"
        if (
            method in CHANGE_METHODS
            and path.startswith("/v1/")
            and not path.startswith(AGENT_PREFIX)
        ):
            return self.changes, "changes (POST, PATCH, PUT, DELETE)"
        if method == "GET" and path.startswith("/v1/") and not path.startswith(AGENT_PREFIX):
            return self.reads, "reads (GET)"
        return None

    def charge_user(
        self,
        kind: UserCharge,
        user_id: int,
        org_id: int | None,
        cost: float = 1.0,
        now: float | None = None,
    ) -> None:
        """A request of `kind`, once its token is known: the user's bucket (over all their
        tokens), then the org's (over all its users; none for a platform admin).
        TooManyRequests past one. `now`: when the request was admitted (`ADMITTED_AT` in its
        scope's state), so that its token's bucket and these are charged at one instant and
        refill together: charged after authentication, under load a second later, they made a
        client that waited the token bucket's Retry-After meet a user bucket still short of a
        token, and that refusal spend the token bucket's token again."""
        for buckets, key, whose in self._user_buckets(kind, user_id, org_id):
            wait_s = buckets.take(key, now=now, cost=cost)
            if wait_s > 0:
                retry_after = max(1, math.ceil(wait_s))
                raise TooManyRequests(
                    f"more than {buckets.rate_per_s:g} {USER_CHARGES[kind]} per second (bursts "
                    f"of {buckets.burst:g}) {whose}; retry after {retry_after} s",
                    rate_per_s=buckets.rate_per_s,
                    burst=int(buckets.burst),
                    retry_after_s=retry_after,
                )

    def try_charge_user(self, kind: UserCharge, user_id: int, org_id: int | None) -> bool:
        """`charge_user` for one request, taken only when every bucket has room (True); False
        takes nothing (the direct routes then hand the request on, whose route refuses it)."""
        charges = self._user_buckets(kind, user_id, org_id)
        if any(buckets.wait_s(key) > 0 for buckets, key, _ in charges):
            return False
        for buckets, key, _ in charges:
            buckets.take(key)
        return True

    def _user_buckets(
        self, kind: UserCharge, user_id: int, org_id: int | None
    ) -> list[tuple[TokenBuckets, str, str]]:
        charges = [(self.per_user[kind], str(user_id), "from your tokens together")]
        if org_id is not None:
            charges.append((self.per_org[kind], str(org_id), "from your org's users together"))
        return charges

    async def admit(
        self, scope: Scope, send: Send, sessionmaker: async_sessionmaker[AsyncSession] | None
    ) -> bool:
        """True: go on. False: the request was answered (400, 401, 403 or 429)."""
        path: str = scope["path"]
        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            # No name or id holds one, and PostgreSQL refuses it in a lookup (500).
            await _refuse(send, 400, "a URL must not contain NUL characters", "", [])
            return False
        agent = path.startswith(AGENT_PREFIX)
        limited = self._buckets(scope["method"], path)
        if not agent and limited is None:
            return True
        authorization, length = _headers(scope)
        secret = parse_bearer(authorization.decode("latin-1"))
        if agent:
            if secret is None:
                await _refuse(
                    send,
                    401,
                    "missing or malformed bearer token (Authorization: Bearer <token>)",
                    path,
                    [(b"www-authenticate", b"Bearer")],
                )
                return False
            small = length is not None and length.isdigit() and int(length) <= MAX_BODY_BYTES
            if (
                not small
                and sessionmaker is not None
                and not await self._agent_token(secret, path, send, sessionmaker)
            ):
                return False
        if limited is not None and secret is not None:
            buckets, what = limited
            now = time.monotonic()
            scope.setdefault("state", {})[ADMITTED_AT] = now
            wait_s = buckets.take(hash_token(secret), now=now)
            if wait_s > 0:
                retry_after = max(1, math.ceil(wait_s))
                await _refuse(
                    send,
                    429,
                    f"more than {buckets.rate_per_s:g} {what} per second (bursts of "
                    f"{buckets.burst:g}) from this token; retry after {retry_after} s",
                    path,
                    [(b"retry-after", str(retry_after).encode())],
                    rate_per_s=buckets.rate_per_s,
                    burst=int(buckets.burst),
                    retry_after_s=retry_after,
                )
                return False
        return True

    def charge_submissions(
        self, authorization: str, jobs: int, user_id: int, org_id: int | None
    ) -> None:
        """An array is `jobs` submissions, not one: the request paid for one on admission,
        the rest (up to the burst) is taken now, from the token's, the user's and the org's
        buckets, or TooManyRequests says when to retry."""
        secret = parse_bearer(authorization)
        if secret is None or jobs <= 1:
            return
        # Admission took one; at most the rest of a full bucket, so one large array can pass.
        cost = min(jobs, self.submits.burst) - 1.0
        wait_s = self.submits.take(hash_token(secret), cost=cost)
        if wait_s > 0:
            retry_after = max(1, math.ceil(wait_s))
            raise TooManyRequests(
                f"an array of {jobs} jobs counts as {jobs} submissions: more than "
                f"{self.submits.rate_per_s:g} per second (bursts of {self.submits.burst:g}) "
                f"from this token; retry after {retry_after} s",
                rate_per_s=self.submits.rate_per_s,
                burst=int(self.submits.burst),
                retry_after_s=retry_after,
            )
        try:
            self.charge_user("submissions", user_id, org_id, cost)
        except TooManyRequests as refused:
            refused.detail = f"an array of {jobs} jobs counts as {jobs} submissions: " + (
                refused.detail
            )
            raise

    async def _agent_token(
        self,
        secret: str,
        path: str,
        send: Send,
        sessionmaker: async_sessionmaker[AsyncSession],
    ) -> bool:
        """A large agent-protocol body is read only for a live agent or join token."""
        try:
            async with sessionmaker() as session:
                row = await find_valid_token(session, secret, now=utcnow())
                kind = None if row is None else row.kind
        except Exception:  # the database is away: the client retries, as after any 503
            await _refuse(
                send,
                503,
                "the database is unavailable; retry shortly",
                path,
                [(b"retry-after", str(RETRY_AFTER_S).encode())],
            )
            return False
        if kind is None:
            await _refuse(
                send, 401, "invalid or expired token", path, [(b"www-authenticate", b"Bearer")]
            )
            return False
        if kind not in AGENT_KINDS:
            await _refuse(send, 403, "the agent protocol needs an agent or join token", path, [])
            return False
        return True
