"""Direct routes: quiet heartbeats and plain submissions, answered before FastAPI routes them.

At a thousand nodes a server answers thousands of heartbeats a second, and nearly all of them
say only "still here, same tasks, here are my GPUs". Through FastAPI's routing, dependency
injection, validation and response model each costs several times the database work (about
2.5 ms of CPU against 0.3 ms), so `FairgpuApp.__call__` gives these requests to `DirectRoutes`
first, which answers the common case itself:

- `POST /v1/agent/heartbeat` from a live agent credential: one read on the lean pool
  (credential, node and active tasks, scheduler/services/heartbeat/read.py), then
  `Heartbeats.answer` as on the routed path, which answers a quiet heartbeat (long-poll
  included) and says when it needs the full path.
- `POST /v1/jobs` by a user whose token this process authenticated in the last
  `auth_cache_ttl_s`, to their own org, with a time limit and no dependencies: one insert
  (scheduler/services/jobinsert.py).

Everything else — a body that does not validate, an unknown or stale credential, a heartbeat
that changes something, a submission naming an org, a database error before anything was
written — is handed, body and all, to the ordinary routes, which remain the one place that
decides errors and every other case. Both give the same answers (tests/api/test_direct.py runs
the protocol with the direct routes on and off; the setting is `hot_paths`). They need
PostgreSQL (the lean asyncpg pool, scheduler/db/leanpool.py); on SQLite every request is routed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from prometheus_client import Counter
from pydantic import ValidationError
from starlette.datastructures import State
from starlette.types import Message, Receive, Scope, Send

from api.admission import Admission
from api.deps import parse_bearer
from api.limits import JOBS_PATH, MAX_AGENT_BODY_BYTES, MAX_BODY_BYTES
from api.problems import PROBLEM_MEDIA_TYPE, RETRY_AFTER_S, problem_body
from api.routers.jobs.submit import checked_idempotency_key
from api.routers.jobs.view import job_public
from api.schemas.jobs import JobCreate
from protocol.agent import Heartbeat
from scheduler.db.engine import error_line
from scheduler.db.leanpool import LeanPool
from scheduler.db.types import utcnow
from scheduler.metrics import PROCESS_REGISTRY
from scheduler.services.errors import InvalidInput, Unauthenticated
from scheduler.services.heartbeat.read import read_by_credential
from scheduler.services.heartbeat.service import Caller, Heartbeats
from scheduler.services.jobinsert import insert_job
from scheduler.services.jobsubmit import JobSpec, new_job, submission_rows
from scheduler.services.scheduling import work
from scheduler.services.tenantlimits import guard_params
from scheduler.services.tokens import hash_token

log = logging.getLogger("fairgpu.api")

HEARTBEAT_PATH = "/v1/agent/heartbeat"

DIRECT_REQUESTS = Counter(
    "fairgpu_api_hot_path_requests",
    "Heartbeats and submissions by whether the direct route answered them or handed them on.",
    ["route", "outcome"],
    registry=PROCESS_REGISTRY,
)
_JSON_HEADERS = [(b"content-type", b"application/json")]

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def _bearer(scope: Scope) -> str | None:
    content_type = b""
    authorization = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"content-type":
            content_type = value
    if not content_type.startswith(b"application/json"):
        return None  # the ordinary route says what it thinks of other media types
    return parse_bearer(authorization.decode("latin-1"))


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool, bool]:
    """(body, complete, disconnected). Stops once past `limit`: the caller hands the request on
    and the size limit answers it."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", False, True
        chunk = message.get("body", b"")
        parts.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(parts), True, False
        if size > limit:
            return b"".join(parts), False, False


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """`receive` for the ordinary route: the bytes already read, then the rest of the stream."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return again


async def _send(send: Send, status: int, payload: bytes, headers: list[Any] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *(headers or _JSON_HEADERS),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def send_problem(
    send: Send, status: int, detail: str, path: str, headers: list[Any] | None = None
) -> None:
    """An RFC 9457 problem, as api/problems.py writes them, without a Request."""
    payload = json.dumps(problem_body(status, detail, path)).encode()
    await _send(
        send, status, payload, [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), *(headers or [])]
    )


class DirectRoutes:
    def __init__(
        self,
        state: State,
        ordinary: Handler,
        pool: LeanPool,
        heartbeats: Heartbeats,
        admission: Admission | None = None,
    ) -> None:
        self.state = state  # the app's
        self.ordinary = ordinary  # the request through FastAPI (FairgpuApp.ordinary)
        self.pool = pool
        self.heartbeats = heartbeats
        self.admission = admission  # the user's and org's rates (api/admission.py)

    def route(self, scope: Scope) -> Handler | None:
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        if path == HEARTBEAT_PATH:
            return self.heartbeat
        if path == JOBS_PATH:
            return self.submit
        return None

    async def _hand_on(
        self, route: str, scope: Scope, receive: Receive, send: Send, body: bytes, complete: bool
    ) -> None:
        DIRECT_REQUESTS.labels(route, "handed_on").inc()
        scope.setdefault("state", {})["direct_route_tried"] = True
        await self.ordinary(scope, _replay(body, complete, receive), send)

    # -- heartbeats ---------------------------------------------------------------------------

    async def heartbeat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, complete, gone = await _read_body(receive, MAX_AGENT_BODY_BYTES)
        if gone:
            return
        answered = False
        if complete and (secret := _bearer(scope)) is not None:
            answered = await self._quiet_heartbeat(secret, body, scope, receive, send)
        if not answered:
            await self._hand_on("heartbeat", scope, receive, send, body, complete)

    async def _quiet_heartbeat(
        self, secret: str, raw: bytes, scope: Scope, receive: Receive, send: Send
    ) -> bool:
        if self.heartbeats.buffer is None:
            return False  # every heartbeat is written at once: the routed path does that
        try:
            body = Heartbeat.model_validate_json(raw)
        except ValidationError:
            return False
        credential_hash = hash_token(secret)
        try:
            found = await read_by_credential(self.pool, credential_hash)
        except (
            OSError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ) as exc:
            log.debug("direct heartbeat read failed, handing on: %s", error_line(exc))
            return False
        if found is None or not found.credential.usable_without_routing(utcnow()):
            return False
        self.state.auth_cache.vouch(credential_hash)  # live (api/authfailures.py)
        assert found.credential.node_id is not None
        caller = Caller(
            node_id=found.credential.node_id,
            credential_hash=credential_hash,
            expires_at=found.credential.expires_at,
        )
        try:
            reply = await self.heartbeats.answer(caller, body, node=found.node, full_path=False)
        except Unauthenticated as exc:  # revoked while held
            DIRECT_REQUESTS.labels("heartbeat", "answered").inc()
            await send_problem(send, 401, str(exc), HEARTBEAT_PATH)
            return True
        if reply is None:
            return False
        DIRECT_REQUESTS.labels("heartbeat", "answered").inc()
        await _send(send, 200, work.reply_json(reply).encode())
        return True

    # -- submissions --------------------------------------------------------------------------

    async def submit(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, complete, gone = await _read_body(receive, MAX_BODY_BYTES)
        if gone:
            return
        answered = False
        if complete and (secret := _bearer(scope)) is not None:
            answered = await self._plain_submit(secret, body, scope, send)
        if not answered:
            await self._hand_on("submit", scope, receive, send, body, complete)

    async def _plain_submit(self, secret: str, raw: bytes, scope: Scope, send: Send) -> bool:
        state = self.state
        settings = state.settings
        now = utcnow()
        principal = state.auth_cache.get(hash_token(secret), now)
        if (
            principal is None
            or principal.kind != "user"
            or principal.user_id is None
            or principal.org_id is None
        ):
            return False
        try:
            key = checked_idempotency_key(_header(scope, b"idempotency-key"))
        except InvalidInput:
            return False
        try:
            create = JobCreate.model_validate_json(raw)
        except ValidationError:
            return False
        if (
            create.org is not None
            or create.depends_on
            or create.time_limit is None
            or create.image is not None
            or create.secret_env
            or create.array is not None
            or create.dependency is not None
            or create.signal is not None
            or create.interactive
            or (settings.private_network_required and create.network != "private")
            or create.priority_class not in state.submit_limits.priority_classes
        ):
            # Another org, dependencies, the org's default limit, an image to check against
            # the org's allow-list, secrets to encrypt, an array's elements, a warning signal
            # to check against the time limit and the longest grace, an interactive job's
            # time limit to check against its org's maximum, a network the server decides
            # (FAIRGPU_PRIVATE_NETWORK_REQUIRED), a class the policy does
            # not know (the route's 422 names those it does): the ordinary route.
            return False
        if create.time_limit > settings.max_time_limit_s:
            return False
        # Last: a request handed on above pays in the ordinary route, once.
        if self.admission is not None and not self.admission.try_charge_user(
            "submissions", principal.user_id, principal.org_id
        ):
            return False  # the ordinary route refuses it with 429 and Retry-After
        spec = JobSpec(**create.spec_fields())
        values, event = submission_rows(
            org_id=principal.org_id,
            user_id=principal.user_id,
            actor=principal.actor,
            spec=spec,
            idempotency_key=key,
            time_limit_s=create.time_limit,
            now=now,
        )
        try:
            job_id = await insert_job(
                self.pool, values, event, guard_params(spec.priority_class, state.submit_limits)
            )
        except (
            OSError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ) as exc:
            # The insert may or may not have happened: not retried here. The client retries
            # (with its Idempotency-Key, exactly once), as after any 503.
            log.warning("database unavailable on %s: %s", JOBS_PATH, error_line(exc))
            DIRECT_REQUESTS.labels("submit", "unavailable").inc()
            await send_problem(
                send,
                503,
                "the database is unavailable; retry shortly",
                JOBS_PATH,
                [(b"retry-after", str(RETRY_AFTER_S).encode())],
            )
            return True
        except asyncpg.PostgresError as exc:
            log.info("direct submission refused by the database, handing on: %s", error_line(exc))
            return False
        if job_id is None:
            # The key is taken (the ordinary route answers with the first job) or a tenant
            # limit refused it (the ordinary route says which, with the numbers).
            return False
        DIRECT_REQUESTS.labels("submit", "answered").inc()
        state.runtime.notify("submit")
        public = job_public(new_job(job_id, values))
        await _send(send, 201, public.model_dump_json().encode())
        return True
