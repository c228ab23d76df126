"""`/v1/users`: org admins manage their org's users; platform admins manage everyone."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from api.deps import OrgAdmin, Principal, SessionDep, UserPrincipal
from api.schemas.common import MAX_PAGE_SIZE
from api.schemas.users import UserCreate, UserPublic, UsersPublic
from scheduler.db import User
from scheduler.services import users as svc
from scheduler.services.errors import Forbidden, InvalidInput, NotFound
from scheduler.services.orgs import find_org, org_id_of
from scheduler.settings import Settings
from scheduler.states import Role

router = APIRouter(prefix="/v1/users", tags=["users"])

UserId = Annotated[int, Path(gt=0, lt=2**31)]


def admin_scope(principal: Principal) -> int | None:
    """The org whose users the caller administers; None for platform admins."""
    if principal.is_platform_admin:
        return None
    return principal.org_id if principal.org_id is not None else -1


@router.get("/me")
async def me(session: SessionDep, principal: UserPrincipal) -> UserPublic:
    """The caller."""
    assert principal.user_id is not None
    return UserPublic.model_validate(await session.get(User, principal.user_id))


@router.get("")
async def list_users(
    session: SessionDep,
    principal: OrgAdmin,
    cursor: Annotated[str | None, Query(max_length=24, pattern=r"^\d+$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = MAX_PAGE_SIZE,
) -> UsersPublic:
    """Users of the caller's org (org admins) or of every org (platform admins), disabled ones
    included, by id: `limit` a page, `next_cursor` goes on. Pages, because disabled users stay
    and an org admin may create and disable users without end (the cap counts enabled ones)."""
    after = int(cursor) if cursor is not None and int(cursor) < 2**31 else None
    if cursor is not None and after is None:
        return UsersPublic(data=[], count=0, next_cursor=None)  # beyond every id
    rows, following = await svc.list_users(
        session, scope_org_id=admin_scope(principal), after_id=after, limit=limit
    )
    return UsersPublic(
        data=[UserPublic.model_validate(u) for u in rows],
        count=len(rows),
        next_cursor=None if following is None else str(following),
    )


@router.post("", status_code=201)
async def create_user(
    request: Request, body: UserCreate, session: SessionDep, principal: OrgAdmin
) -> UserPublic:
    """Create a user. Org admins create members and org admins of their own org; only platform
    admins create users elsewhere or other platform admins. An org has at most
    `max_users_per_org` enabled users and `max_user_rows_per_org` users in all, disabled ones
    included (409 beyond)."""
    if principal.is_platform_admin:
        org_id = (await find_org(session, body.org)).id if body.org is not None else None
        if org_id is None and body.role is not Role.PLATFORM_ADMIN:
            raise InvalidInput("members and org admins belong to an org: give `org`")
    else:
        if body.role is Role.PLATFORM_ADMIN:
            raise Forbidden("only platform admins create platform admins")
        org_id = principal.org_id
        # The same refusal whether or not `body.org` names an org: no probing of names.
        if body.org is not None and await org_id_of(session, body.org) != org_id:
            raise Forbidden("org admins create users in their own org only")
    settings: Settings = request.app.state.settings
    user = await svc.create_user(
        session,
        name=body.name,
        org_id=org_id,
        role=body.role,
        actor=principal.actor,
        max_per_org=settings.max_users_per_org,
        max_rows_per_org=settings.max_user_rows_per_org,
    )
    await session.commit()
    return UserPublic.model_validate(user)


async def _visible_user(session: SessionDep, principal: Principal, user_id: int) -> User:
    if principal.user_id == user_id:
        return await svc.get_user(session, user_id, scope_org_id=None)
    if principal.role is Role.MEMBER:
        raise NotFound(f"user {user_id} not found")
    return await svc.get_user(session, user_id, scope_org_id=admin_scope(principal))


@router.get("/{user_id}")
async def get_user(user_id: UserId, session: SessionDep, principal: UserPrincipal) -> UserPublic:
    """A user: yourself, or one you administer."""
    return UserPublic.model_validate(await _visible_user(session, principal, user_id))


@router.delete("/{user_id}")
async def disable_user(
    request: Request, user_id: UserId, session: SessionDep, principal: OrgAdmin
) -> UserPublic:
    """Disable a user: its tokens are revoked and its pending jobs (held ones included)
    cancelled at once, each with an event naming why; running jobs run on (cancel them
    apart), and every job stays for accounting."""
    user = await _visible_user(session, principal, user_id)
    if user.role is Role.PLATFORM_ADMIN and not principal.is_platform_admin:
        raise Forbidden("only platform admins disable platform admins")
    cancelled = await svc.disable_user(session, user, actor=principal.actor)
    await session.commit()
    request.app.state.auth_cache.clear()
    if cancelled:
        request.app.state.runtime.notify("cancel")
    return UserPublic.model_validate(user)
