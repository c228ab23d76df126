"""Bootstrapping trust: the first platform administrator and its token.

Everything else in the API needs a token, so the first one is made directly in the database by
someone who can reach it (`fairgpu admin bootstrap`).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Event, User
from scheduler.services.errors import Conflict
from scheduler.services.tokens import IssuedToken, issue_token
from scheduler.services.users import find_user
from scheduler.states import Role, TokenKind


async def bootstrap_admin(
    session: AsyncSession, *, name: str, ttl_s: float, force: bool = False
) -> IssuedToken:
    """A platform-admin user named `name` (created, or reused when forced) and a new token.

    Refuses when any platform admin exists, unless `force`: a second run must not quietly hand
    out administrator rights to whoever can run the command.
    """
    existing = (
        await session.scalars(select(User).where(User.role == Role.PLATFORM_ADMIN).limit(5))
    ).all()
    if existing and not force:
        names = ", ".join(u.name for u in existing)
        raise Conflict(f"a platform admin already exists ({names}); use --force to add a token")
    user = await find_user(session, name, org_id=None)  # an org's user of that name is another
    if user is None:
        user = User(name=name, org_id=None, role=Role.PLATFORM_ADMIN)
        session.add(user)
        await session.flush()
    elif user.role is not Role.PLATFORM_ADMIN or user.disabled_at is not None:
        if not force:
            raise Conflict(f"user {name!r} exists and is not an active platform admin")
        user.role = Role.PLATFORM_ADMIN
        user.disabled_at = None
    issued = await issue_token(
        session, kind=TokenKind.USER, name="bootstrap", user_id=user.id, ttl_s=ttl_s
    )
    session.add(
        Event(kind="admin.bootstrap", actor="cli:bootstrap", details={"user": name, "force": force})
    )
    await session.flush()
    return issued
