"""Open streams checked again: the token behind a user's side, and the user's access to the job.

A stream (`attach`, `run --pty`, `attach --new`, `port-forward`) is authenticated when it
opens, and a shell can then last for days. Without a second look, revoking its token, the
token's expiry, disabling its user or taking away their access to the job (a departing
engineer removed by their company) would leave a shell in the company's job running. So the
process holding the user's side asks again when the relay starts, then every
`stream_auth_recheck_s` and just after the token's expiry when that comes sooner, with the same
authentication every request uses (api/deps.authenticate, through the auth cache: a change made
through this process is seen at the next check, one made through another replica within
`auth_cache_ttl_s` more) and the same rule as at the opening (the job's owner, an org-admin of
its org or a platform admin). When the answer is no, the relay closes both sides
(api/routers/streams.py): the user's with 1008 (policy violation) and the reason, the agent's
as for any ending, so the node ends a new shell or a forwarded connection and detaches an
attached terminal.

A check that cannot be made (the database unreachable) keeps the stream and tries again at the
next: a database outage must not end every shell of every tenant at once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import NamedTuple

from sqlalchemy.exc import SQLAlchemyError
from starlette.websockets import WebSocket

from api.deps import authenticate, parse_bearer
from api.routers.jobs.view import scope_of
from scheduler.db.engine import run_to_end
from scheduler.db.types import utcnow
from scheduler.services.errors import DomainError, Unauthenticated
from scheduler.services.jobactions import check_may_act
from scheduler.services.jobqueries import get_job

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
"""The WebSocket close code of a stream whose user may no longer hold it (RFC 6455)."""


EXPIRY_SLACK_S = 0.2
"""How long after its token's expiry a stream's next check comes: past it, not before."""


class Verdict(NamedTuple):
    reason: str | None
    """Why the user may no longer hold the stream; None while they may."""
    expires_at: datetime | None = None
    """When the token expires, for the next check to come then if sooner."""


async def verdict(websocket: WebSocket, job_id: int) -> Verdict:
    """Whether the user behind `websocket`'s token may still hold a stream into `job_id`: the
    reason why not ("token revoked", "token expired", "user disabled", ...), or None."""
    secret = parse_bearer(websocket.headers.get("authorization", ""))
    if secret is None:  # it authenticated at the opening; kept for the type checker
        return Verdict("no bearer token")
    state = websocket.app.state
    async with state.sessionmaker() as session:
        try:
            principal = await authenticate(
                session, secret, utcnow(), getattr(state, "auth_cache", None)
            )
            if principal.kind != "user" or principal.user_id is None:
                return Verdict("not a user token")
            job = await get_job(session, job_id, scope_org_id=scope_of(principal))
            check_may_act(
                job, user_id=principal.user_id, may_admin_org=principal.can_admin_org(job.org_id)
            )
        except Unauthenticated as error:
            return Verdict(str(error))
        except DomainError:
            return Verdict(f"no longer allowed to reach job {job_id}")
        finally:
            await session.rollback()
    return Verdict(None, principal.expires_at)


async def watch(websocket: WebSocket, job_id: int, every_s: float) -> str:
    """Return the reason as soon as a check finds the stream's user may no longer hold it;
    until then, check on: at once, then every `every_s`, and just after the token's expiry
    when that comes sooner."""
    delay_s = 0.0
    while True:
        await asyncio.sleep(delay_s)
        delay_s = every_s
        try:
            # To its end if the relay ends meanwhile: a cancellation mid-statement leaves the
            # connection neither committed nor rolled back (scheduler/db/engine.run_to_end).
            found = await run_to_end(verdict(websocket, job_id))
        except (SQLAlchemyError, OSError) as error:
            log.warning("stream into job %s: could not check its token again: %r", job_id, error)
            continue
        if found.reason is not None:
            return found.reason
        if found.expires_at is not None:
            left_s = (found.expires_at - utcnow()).total_seconds()
            delay_s = min(every_s, max(0.0, left_s) + EXPIRY_SLACK_S)
