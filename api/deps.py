"""Request dependencies: one database session per request, and who is calling.

Authentication is one indexed query (token hash joined to its user), with no ORM identity map
work: it runs on every request, including every agent heartbeat, so it has to stay cheap.
`last_used_at` is refreshed at most once per `LAST_USED_RESOLUTION`, so a busy token does not
turn every read into a write; and a token seen in the last `auth_cache_ttl_s` is not looked up
again (api/authcache.py).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.authcache import AuthCache
from api.limits import user_charge
from scheduler.db import ApiToken, User
from scheduler.db.engine import run_to_end
from scheduler.db.types import utcnow
from scheduler.services.errors import Forbidden, Unauthenticated
from scheduler.services.tokens import LAST_USED_RESOLUTION, hash_token
from scheduler.states import Role, TokenKind

MAX_TOKEN_CHARS = 256


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request. The route commits; anything not committed is rolled back."""
    maker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with maker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_autocommit_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session whose statements each commit on their own (PostgreSQL; elsewhere a normal
    session). For routes whose one write is a single atomic statement: no BEGIN and COMMIT
    round trips around it. Job submission is the one that matters."""
    maker: async_sessionmaker[AsyncSession] = request.app.state.autocommit_sessionmaker
    async with maker() as session:
        yield session


AutocommitSessionDep = Annotated[AsyncSession, Depends(get_autocommit_session)]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a person (with an org and a role) or a node agent (with its node)."""

    kind: Literal["user", "agent"]
    token_id: int
    user_id: int | None = None
    user_name: str | None = None
    org_id: int | None = None
    role: Role | None = None
    node_id: int | None = None
    expires_at: datetime | None = None

    @property
    def is_platform_admin(self) -> bool:
        return self.role is Role.PLATFORM_ADMIN

    @property
    def actor(self) -> str:
        """How events name who did something: `user:NAME` for an org's user, `admin:NAME` for
        a platform admin (user names are per org: a platform admin `jane` and an org's `jane`
        acting on the same job must not read alike)."""
        if self.kind == "agent":
            return f"agent:{self.node_id}"
        if self.is_platform_admin:
            return f"admin:{self.user_name}"
        return f"user:{self.user_name}"

    def can_see_org(self, org_id: int | None) -> bool:
        return self.is_platform_admin or (org_id is not None and org_id == self.org_id)

    def can_admin_org(self, org_id: int | None) -> bool:
        if self.is_platform_admin:
            return True
        return self.role is Role.ORG_ADMIN and org_id is not None and org_id == self.org_id


def parse_bearer(header: str) -> str | None:
    """The secret of an `Authorization: Bearer <secret>` header; None when malformed."""
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or len(secret) > MAX_TOKEN_CHARS:
        return None
    return secret


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
    secret = parse_bearer(header)
    if secret is None:
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <token>'")
    return secret


_TOKEN_QUERY = select(
    ApiToken.id,
    ApiToken.kind,
    ApiToken.token_hash,
    ApiToken.user_id,
    ApiToken.node_id,
    ApiToken.expires_at,
    ApiToken.revoked_at,
    ApiToken.last_used_at,
    User.name,
    User.org_id,
    User.role,
    User.disabled_at,
).outerjoin(User, User.id == ApiToken.user_id)


async def authenticate(
    session: AsyncSession, secret: str, now: datetime, cache: AuthCache | None = None
) -> Principal:
    """The principal for a user or agent token; join tokens only register nodes (S2 checks)."""
    digest = hash_token(secret)
    if cache is not None and (hit := cache.get(digest, now)) is not None:
        return hit
    principal, expires_at, superseded = await _lookup(session, digest, now)
    if cache is not None:
        if superseded:
            cache.clear()  # the node's older credentials may be cached here
        cache.put(digest, principal, expires_at)
    return principal


async def _lookup(
    session: AsyncSession, digest: str, now: datetime
) -> tuple[Principal, datetime | None, bool]:
    """The principal, its expiry, and whether this first use of a node credential revoked the
    node's older ones."""
    stmt = _TOKEN_QUERY.where(ApiToken.token_hash == digest)
    row = (await session.execute(stmt)).one_or_none()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise Unauthenticated("unknown token")
    if row.kind == TokenKind.USER and row.disabled_at is not None:
        # Before the revocation: disabling a user revokes their tokens, and says why.
        raise Unauthenticated("user disabled")
    if row.revoked_at is not None:
        raise Unauthenticated("token revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthenticated("token expired")
    superseded = False
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        superseded = (
            row.kind == TokenKind.AGENT and row.last_used_at is None and row.node_id is not None
        )
        await run_to_end(_touch(session, row.id, row.node_id if superseded else None, now))
    if row.kind == TokenKind.AGENT:
        if row.node_id is None:
            raise Unauthenticated("agent credential without a node")
        principal = Principal(
            kind="agent", token_id=row.id, node_id=row.node_id, expires_at=row.expires_at
        )
        return principal, row.expires_at, superseded
    if row.kind == TokenKind.USER:
        if row.user_id is None or row.disabled_at is not None:
            raise Unauthenticated("user disabled")
        principal = Principal(
            kind="user",
            token_id=row.id,
            user_id=row.user_id,
            user_name=row.name,
            org_id=row.org_id,
            role=Role(row.role),
            expires_at=row.expires_at,
        )
        return principal, row.expires_at, False
    raise Forbidden("a join token only registers nodes (POST /v1/agent/register)")


async def _touch(
    session: AsyncSession, token_id: int, supersede_node: int | None, now: datetime
) -> None:
    """Stamp the token's use; with `supersede_node` (a renewed credential's first use) the
    node's older credentials end now."""
    await session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now))
    if supersede_node is not None:
        await session.execute(
            update(ApiToken)
            .where(
                ApiToken.node_id == supersede_node,
                ApiToken.kind == TokenKind.AGENT,
                ApiToken.id < token_id,
                ApiToken.revoked_at.is_(None),
            )
            .values(revoked_at=now)
        )
    await session.commit()


def auth_cache(request: Request) -> AuthCache | None:
    cache: AuthCache | None = getattr(request.app.state, "auth_cache", None)
    return cache


async def current_principal(request: Request, session: SessionDep) -> Principal:
    return await authenticate(session, _bearer(request), utcnow(), auth_cache(request))


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def user_principal(request: Request, principal: CurrentPrincipal) -> Principal:
    """A person; the request also pays into its user's and its org's rate of its kind (reads,
    submissions, other changes), so that neither many tokens nor many users multiply what one
    tenant may ask of the server."""
    if principal.kind != "user":
        raise Forbidden("agent credentials speak only the agent protocol")
    _charge_user(request, principal)
    return principal


UserPrincipal = Annotated[Principal, Depends(user_principal)]


async def autocommit_user_principal(request: Request, session: AutocommitSessionDep) -> Principal:
    """`UserPrincipal`, authenticated on the request's autocommit session."""
    principal = await authenticate(session, _bearer(request), utcnow(), auth_cache(request))
    if principal.kind != "user":
        raise Forbidden("agent credentials speak only the agent protocol")
    _charge_user(request, principal)
    return principal


ADMITTED_AT = "fairgpu_admitted_at"
"""The key in a request's scope state of the monotonic time its token's bucket was charged
(api/admission.py `admit`): the user's and the org's buckets are charged at that instant."""


def _charge_user(request: Request, principal: Principal) -> None:
    """The user's and the org's buckets (api/admission.py `charge_user`); TooManyRequests."""
    admission = getattr(request.app, "admission", None)
    if admission is None or principal.user_id is None:
        return
    kind = user_charge(request.method, request.url.path)
    if kind is None:
        return
    at = request.scope.get("state", {}).get(ADMITTED_AT)
    admission.charge_user(kind, principal.user_id, principal.org_id, now=at)


AutocommitUserPrincipal = Annotated[Principal, Depends(autocommit_user_principal)]


async def agent_principal(principal: CurrentPrincipal) -> Principal:
    if principal.kind != "agent":
        raise Forbidden("this endpoint is for node agents only")
    return principal


AgentPrincipal = Annotated[Principal, Depends(agent_principal)]


async def autocommit_agent_principal(request: Request, session: AutocommitSessionDep) -> Principal:
    """`AgentPrincipal`, authenticated on the request's autocommit session (heartbeats)."""
    principal = await authenticate(session, _bearer(request), utcnow(), auth_cache(request))
    if principal.kind != "agent":
        raise Forbidden("this endpoint is for node agents only")
    return principal


AutocommitAgentPrincipal = Annotated[Principal, Depends(autocommit_agent_principal)]


def require_role(*roles: Role) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency admitting user principals with one of `roles` (platform admins always)."""
    allowed = frozenset(roles) | {Role.PLATFORM_ADMIN}

    async def check(principal: UserPrincipal) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
            raise Forbidden(f"needs one of the roles: {names}")
        return principal

    return check


PlatformAdmin = Annotated[Principal, Depends(require_role(Role.PLATFORM_ADMIN))]
OrgAdmin = Annotated[Principal, Depends(require_role(Role.ORG_ADMIN))]
