"""Open streams checked again: the token behind a user's side, and the user's access to the job.

A stream (`attach`, `run --pty`, `attach --new`, `port-forward`) is authenticated when it
opens, and a shell can then last for days. Without a second look, revoking its token, the
token's expiry, disabling its user or taking away their access to the job (a departing
engineer removed by their company) would leave a shell in the company's job running. So the
process holding the user's side asks again every `stream_auth_recheck_s`, with the same
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


async def refusal(websocket: WebSocket, job_id: int) -> str | None:
    """Why the user behind `websocket`'s token may no longer hold a stream into `job_id`
    ("token revoked", "token expired", "user disabled", ...); None while they may."""
    secret = parse_bearer(websocket.headers.get("authorization", ""))
    if secret is None:  # it authenticated at the opening; kept for the type checker
        return "no bearer token"
    state = websocket.app.state
    async with state.sessionmaker() as session:
        try:
            principal = await authenticate(
                session, secret, utcnow(), getattr(state, "auth_cache", None)
            )
            if principal.kind != "user" or principal.user_id is None:
                return "not a user token"
            job = await get_job(session, job_id, scope_org_id=scope_of(principal))
            check_may_act(
                job, user_id=principal.user_id, may_admin_org=principal.can_admin_org(job.org_id)
            )
        except Unauthenticated as error:
            return str(error)
        except DomainError:
            return f"no longer allowed to reach job {job_id}"
        finally:
            await session.rollback()
    return None


async def watch(websocket: WebSocket, job_id: int, every_s: float) -> str:
    """Return the reason as soon as a check every `every_s` finds the stream's user may no
    longer hold it; until then, check on."""
    while True:
        await asyncio.sleep(every_s)
        try:
            # To its end if the relay ends meanwhile: a cancellation mid-statement leaves the
            # connection neither committed nor rolled back (scheduler/db/engine.run_to_end).
            reason = await run_to_end(refusal(websocket, job_id))
        except (SQLAlchemyError, OSError) as error:
            log.warning("stream into job %s: could not check its token again: %r", job_id, error)
            continue
        if reason is not None:
            return reason
