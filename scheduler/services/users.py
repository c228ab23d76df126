"""Users and their API tokens: create, list, disable, issue and revoke.

Who may do what is decided by the caller (the API's dependencies); these functions check only
what the data itself requires.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import ApiToken, Event, Job, Org, Site, User
from scheduler.db.types import utcnow
from scheduler.services.errors import Conflict, NotFound
from scheduler.services.jobstate import transition_job
from scheduler.services.rowlocks import lock_owner_row
from scheduler.services.tokens import IssuedToken, issue_token
from scheduler.states import Role, TokenKind


async def create_user(
    session: AsyncSession,
    *,
    name: str,
    org_id: int | None,
    role: Role,
    actor: str,
    max_per_org: int | None = None,
    max_rows_per_org: int | None = None,
) -> User:
    """A new user; in an org, only while it has fewer than `max_per_org` enabled users and
    `max_rows_per_org` users in all, disabled ones included (409): rates and stream caps are
    per user and per token, so an org admin creating users without end would multiply what
    the org can load onto the server, and creating and disabling them without end would grow
    the users table. A name is unique within its org only (platform admins: among them), so
    that a refusal says nothing of other orgs' users."""
    if await find_user(session, name, org_id=org_id) is not None:
        where = "in this org" if org_id is not None else "among platform admins"
        raise Conflict(f"user {name!r} already exists {where}")
    if org_id is not None and (max_per_org is not None or max_rows_per_org is not None):
        await lock_owner_row(session, Org, org_id)
        if max_per_org is not None:
            await _check_room(session, org_id, max_per_org)
        if max_rows_per_org is not None:
            await _check_rows(session, org_id, max_rows_per_org)
    user = User(name=name, org_id=org_id, role=role)
    session.add(user)
    await session.flush()
    session.add(
        Event(kind="user.create", org_id=org_id, actor=actor, details={"user": name, "role": role})
    )
    await session.flush()
    return user


async def _check_room(session: AsyncSession, org_id: int, cap: int) -> None:
    """409 when the org has `cap` enabled users already (counted up to the cap). The caller
    holds the org's row locked to the end of the transaction, so that concurrent creations
    count in turn."""
    enabled = select(User.id).where(User.org_id == org_id, User.disabled_at.is_(None))
    count = int(
        await session.scalar(select(func.count()).select_from(enabled.limit(cap).subquery())) or 0
    )
    if count >= cap:
        raise Conflict(
            f"the org has {count} enabled users, the most one org may have "
            "(max_users_per_org): disable one first (fairgpu user disable NAME)",
            limit="max_users_per_org",
            cap=cap,
            count=count,
        )


async def _check_rows(session: AsyncSession, org_id: int, cap: int) -> None:
    """409 when the org keeps `cap` users already, disabled ones included (counted up to the
    cap, under the caller's lock of the org's row)."""
    rows = select(User.id).where(User.org_id == org_id)
    count = int(
        await session.scalar(select(func.count()).select_from(rows.limit(cap).subquery())) or 0
    )
    if count >= cap:
        raise Conflict(
            f"the org keeps {count} users, disabled ones included, the most one org may keep "
            "(max_user_rows_per_org): a disabled user that owns no jobs is deleted after the "
            "audit retention (FAIRGPU_AUDIT_RETENTION_S), or a platform admin may raise the cap",
            limit="max_user_rows_per_org",
            cap=cap,
            count=count,
        )


async def find_user(session: AsyncSession, name: str, *, org_id: int | None) -> User | None:
    """The user named `name` in org `org_id`, or among platform admins when None: names are
    unique only there (uq_users_org_id, uq_users_platform_admin_name)."""
    in_org = User.org_id.is_(None) if org_id is None else User.org_id == org_id
    return await session.scalar(select(User).where(in_org, User.name == name))


async def get_user(session: AsyncSession, user_id: int, *, scope_org_id: int | None) -> User:
    user = await session.get(User, user_id) if 0 < user_id < 2**31 else None
    if user is None or (scope_org_id is not None and user.org_id != scope_org_id):
        raise NotFound(f"user {user_id} not found")
    return user


async def list_users(
    session: AsyncSession,
    *,
    scope_org_id: int | None,
    after_id: int | None = None,
    limit: int | None = None,
) -> tuple[list[User], int | None]:
    """Users by id, after `after_id`, at most `limit` (None: all); of one org unless
    `scope_org_id` is None. Returns (users, the `after_id` of the next page or None).
    Disabled users stay (their jobs name them), so an org's rows grow with every user it
    ever had: a listing comes in pages."""
    stmt = select(User).order_by(User.id)
    if scope_org_id is not None:
        stmt = stmt.where(User.org_id == scope_org_id)
    if after_id is not None:
        stmt = stmt.where(User.id > after_id)
    if limit is not None:
        stmt = stmt.limit(limit + 1)
    rows = list((await session.scalars(stmt)).all())
    if limit is not None and len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


async def disable_user(
    session: AsyncSession, user: User, *, actor: str, now: datetime | None = None
) -> int:
    """Disable the user, revoke every token it holds and cancel its pending jobs (held ones
    included); returns how many were cancelled.

    As when Slurm removes a user's association: nobody may act as the user any more, and
    nothing it queued starts later on its org's quota. Jobs already running run on to their
    end unless an admin cancels them; every job, ended or cancelled here, stays for
    accounting, each cancellation with an event naming the disable and who did it.
    """
    now = now or utcnow()
    await session.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    # Locked and read again: a job the scheduler started meanwhile is no longer PENDING.
    pending = (
        await session.scalars(
            select(Job)
            .where(Job.user_id == user.id, Job.state == JobState.PENDING)
            .order_by(Job.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).all()
    reason = f"user {user.name} was disabled by {actor}"
    for job in pending:
        transition_job(session, job, JobState.CANCELLED, actor=actor, reason=reason, at=now)
    if user.disabled_at is None or pending:
        session.add(
            Event(
                at=now,
                kind="user.disable",
                org_id=user.org_id,
                actor=actor,
                details={"user": user.name, "cancelled_jobs": len(pending)},
            )
        )
    if user.disabled_at is None:
        user.disabled_at = now
    await session.flush()
    return len(pending)


async def create_user_token(
    session: AsyncSession,
    *,
    user: User,
    name: str,
    ttl_s: float,
    created_by_user_id: int | None,
    max_live: int,
) -> IssuedToken:
    """A new token for `user`, unless it already holds `max_live` live ones (409): rate limits
    are per token, so an unbounded number of tokens would be an unbounded rate."""
    await lock_owner_row(session, User, user.id)  # concurrent issues count in turn
    now = utcnow()
    live = await session.scalar(
        select(func.count()).where(
            ApiToken.kind == TokenKind.USER,
            ApiToken.user_id == user.id,
            ApiToken.revoked_at.is_(None),
            or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
        )
    )
    if (live or 0) >= max_live:
        raise Conflict(
            f"user {user.name} holds {live} live tokens, the most one user may hold "
            "(max_tokens_per_user): revoke one first (fairgpu token revoke ID)",
            limit="max_tokens_per_user",
            cap=max_live,
            count=live,
        )
    return await issue_token(
        session,
        kind=TokenKind.USER,
        name=name,
        user_id=user.id,
        created_by_user_id=created_by_user_id,
        ttl_s=ttl_s,
        now=now,
    )


MAX_DEAD_TOKENS_LISTED = 100
"""Revoked or expired tokens a listing shows, the latest first: a loop of issue and revoke
leaves dead rows (until audit retention) that one listing must not load all at once."""


async def list_tokens(
    session: AsyncSession,
    *,
    kind: TokenKind,
    user_ids: list[int] | None,
    org_id: int | None = None,
    after_id: int | None = None,
    limit: int | None = None,
) -> tuple[list[ApiToken], int | None]:
    """Live tokens of `kind` by id, after `after_id`, at most `limit` (None: all), and on the
    first page (no `after_id`) the latest MAX_DEAD_TOKENS_LISTED revoked or expired ones; for
    `user_ids` only (None: all), and of `org_id`'s users only when given. Returns (tokens by
    id, the `after_id` of the next page, None when no live one follows)."""
    now = utcnow()
    dead = or_(
        ApiToken.revoked_at.is_not(None),
        and_(ApiToken.expires_at.is_not(None), ApiToken.expires_at <= now),
    )
    stmt = select(ApiToken).where(ApiToken.kind == kind)
    if user_ids is not None:
        stmt = stmt.where(ApiToken.user_id.in_(user_ids))
    if org_id is not None:  # by a subquery: the org's users may be many more than a statement's
        stmt = stmt.where(ApiToken.user_id.in_(select(User.id).where(User.org_id == org_id)))
    live_stmt = stmt.where(~dead).order_by(ApiToken.id)
    if after_id is not None:
        live_stmt = live_stmt.where(ApiToken.id > after_id)
    if limit is not None:
        live_stmt = live_stmt.limit(limit + 1)
    live = list(await session.scalars(live_stmt))
    following = None
    if limit is not None and len(live) > limit:
        live = live[:limit]
        following = live[-1].id
    latest_dead: list[ApiToken] = []
    if after_id is None:
        latest_dead = list(
            await session.scalars(
                stmt.where(dead).order_by(ApiToken.id.desc()).limit(MAX_DEAD_TOKENS_LISTED)
            )
        )
    return sorted([*live, *latest_dead], key=lambda t: t.id), following


async def get_token(session: AsyncSession, token_id: int) -> ApiToken:
    row = await session.get(ApiToken, token_id) if 0 < token_id < 2**31 else None
    if row is None:
        raise NotFound(f"token {token_id} not found")
    return row


async def revoke_token(
    session: AsyncSession, token: ApiToken, *, actor: str, now: datetime | None = None
) -> None:
    """Revoking twice is harmless; the first time is the one recorded."""
    if token.revoked_at is None:
        token.revoked_at = now or utcnow()
        session.add(
            Event(
                at=token.revoked_at,
                kind="token.revoke",
                actor=actor,
                details={"token_id": token.id, "kind": str(token.kind)},
            )
        )
    await session.flush()


async def create_join_token(
    session: AsyncSession,
    *,
    name: str,
    site: str | None,
    uses: int | None,
    ttl_s: float,
    created_by_user_id: int | None,
) -> IssuedToken:
    site_id = None
    if site is not None:
        site_id = await session.scalar(select(Site.id).where(Site.name == site))
        if site_id is None:
            row = Site(name=site)
            session.add(row)
            await session.flush()
            site_id = row.id
    return await issue_token(
        session,
        kind=TokenKind.JOIN,
        name=name,
        site_id=site_id,
        uses_left=uses,
        ttl_s=ttl_s,
        created_by_user_id=created_by_user_id,
    )


def is_platform_admin(user: User) -> bool:
    return user.role is Role.PLATFORM_ADMIN
