"""`/v1/tokens` (people's API tokens) and `/v1/join-tokens` (for registering node agents).

A secret is returned once, by the call that creates it; lists never show it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from api.deps import PlatformAdmin, Principal, SessionDep, UserPrincipal
from api.schemas.common import MAX_PAGE_SIZE
from api.schemas.users import (
    JoinTokenCreate,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    TokensPublic,
)
from scheduler.db import ApiToken, User
from scheduler.services import users as svc
from scheduler.services.errors import Forbidden, NotFound
from scheduler.services.tokens import IssuedToken
from scheduler.settings import Settings
from scheduler.states import Role, TokenKind

router = APIRouter(tags=["tokens"])

TokenId = Annotated[int, Path(gt=0, lt=2**31)]


async def _may_manage(session: SessionDep, principal: Principal, user_id: int) -> User:
    """The user whose tokens the caller may manage: itself, its org's users for org admins."""
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    if principal.user_id == user_id or principal.is_platform_admin:
        return user
    if principal.role is Role.ORG_ADMIN and user.org_id == principal.org_id:
        if user.role is Role.PLATFORM_ADMIN:
            raise Forbidden("only platform admins manage platform admins' tokens")
        return user
    raise NotFound(f"user {user_id} not found")


def _created(issued: IssuedToken) -> TokenCreated:
    public = TokenPublic.model_validate(issued.row)
    return TokenCreated(**public.model_dump(), token=issued.secret)


@router.post("/v1/tokens", status_code=201)
async def create_token(
    request: Request, body: TokenCreate, session: SessionDep, principal: UserPrincipal
) -> TokenCreated:
    """Issue an API token for yourself (or, as an admin, for a user you manage). The secret is
    in this response only. Its lifetime is `ttl`, else the server's `token_ttl_s`. A user holds
    at most `max_tokens_per_user` live tokens (409 beyond): rate limits count per token."""
    assert principal.user_id is not None
    user = await _may_manage(session, principal, body.user_id or principal.user_id)
    if user.disabled_at is not None:
        raise Forbidden(f"user {user.name} is disabled")
    settings: Settings = request.app.state.settings
    issued = await svc.create_user_token(
        session,
        user=user,
        name=body.name,
        ttl_s=body.ttl or settings.token_ttl_s,
        created_by_user_id=principal.user_id,
        max_live=settings.max_tokens_per_user,
    )
    await session.commit()
    return _created(issued)


@router.get("/v1/tokens")
async def list_tokens(
    session: SessionDep,
    principal: UserPrincipal,
    user_id: Annotated[int | None, Query(gt=0, lt=2**31)] = None,
    cursor: Annotated[str | None, Query(max_length=24, pattern=r"^\d+$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = MAX_PAGE_SIZE,
) -> TokensPublic:
    """Your tokens; org admins see their org's users' tokens, platform admins everyone's:
    the live ones by id, `limit` a page (`next_cursor` goes on), and on the first page the
    latest 100 revoked or expired. Secrets are never listed.

    Pages, because an org admin may make 1,000 users of 100 live tokens each, all of which a
    platform admin's listing would otherwise carry in one answer."""
    assert principal.user_id is not None
    ids: list[int] | None = None  # None: every user's (or every user's of org_id)
    org_id: int | None = None
    if user_id is not None:
        ids = [(await _may_manage(session, principal, user_id)).id]
    elif principal.is_platform_admin:
        pass
    elif principal.role is Role.ORG_ADMIN and principal.org_id is not None:
        org_id = principal.org_id
    else:
        ids = [principal.user_id]
    after = int(cursor) if cursor is not None and int(cursor) < 2**31 else None
    if cursor is not None and after is None:
        return TokensPublic(data=[], count=0, next_cursor=None)  # beyond every id
    rows, following = await svc.list_tokens(
        session, kind=TokenKind.USER, user_ids=ids, org_id=org_id, after_id=after, limit=limit
    )
    return TokensPublic(
        data=[TokenPublic.model_validate(t) for t in rows],
        count=len(rows),
        next_cursor=None if following is None else str(following),
    )


@router.delete("/v1/tokens/{token_id}")
async def revoke_token(
    request: Request, token_id: TokenId, session: SessionDep, principal: UserPrincipal
) -> TokenPublic:
    """Revoke a token at once; requests with it are refused from now on."""
    token: ApiToken = await svc.get_token(session, token_id)
    if token.kind is not TokenKind.USER or token.user_id is None:
        raise NotFound(f"token {token_id} not found")
    try:
        await _may_manage(session, principal, token.user_id)
    except NotFound:
        # A token of a user the caller does not manage reads as one that does not exist: its
        # owner's id, and that the id is taken, are not for the caller to learn.
        raise NotFound(f"token {token_id} not found") from None
    await svc.revoke_token(session, token, actor=principal.actor)
    await session.commit()
    request.app.state.auth_cache.clear()
    return TokenPublic.model_validate(token)


@router.post("/v1/join-tokens", status_code=201)
async def create_join_token(
    request: Request, body: JoinTokenCreate, session: SessionDep, principal: PlatformAdmin
) -> TokenCreated:
    """A token that lets node agents register (`fairgpu agent --join-token`). Platform admins."""
    settings: Settings = request.app.state.settings
    issued = await svc.create_join_token(
        session,
        name=body.name,
        site=body.site,
        uses=body.uses,
        ttl_s=body.ttl or settings.join_token_ttl_s,
        created_by_user_id=principal.user_id,
    )
    await session.commit()
    return _created(issued)


@router.get("/v1/join-tokens")
async def list_join_tokens(session: SessionDep, principal: PlatformAdmin) -> TokensPublic:
    """Join tokens, without their secrets."""
    rows, _ = await svc.list_tokens(session, kind=TokenKind.JOIN, user_ids=None)
    return TokensPublic(data=[TokenPublic.model_validate(t) for t in rows], count=len(rows))


@router.delete("/v1/join-tokens/{token_id}")
async def revoke_join_token(
    request: Request, token_id: TokenId, session: SessionDep, principal: PlatformAdmin
) -> TokenPublic:
    """Revoke a join token: no more nodes register with it (registered ones stay)."""
    token = await svc.get_token(session, token_id)
    if token.kind is not TokenKind.JOIN:
        raise NotFound(f"join token {token_id} not found")
    await svc.revoke_token(session, token, actor=principal.actor)
    await session.commit()
    request.app.state.auth_cache.clear()
    return TokenPublic.model_validate(token)
