"""Tokens: stored hashed only, and refused once revoked, expired or used up."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import ApiToken
from scheduler.db.types import utcnow
from scheduler.services.tokens import find_valid_token, hash_token, issue_token
from scheduler.states import TokenKind
from tests import factories as f


async def test_secret_is_never_stored_and_finds_its_row(session: AsyncSession) -> None:
    o = await f.org(session)
    u = await f.user(session, o)
    issued = await issue_token(session, kind=TokenKind.USER, user_id=u.id, ttl_s=3600)
    await session.commit()
    assert issued.secret.startswith("fg_u_")
    stored = (await session.scalars(select(ApiToken))).one()
    assert issued.secret not in (stored.token_hash, stored.prefix, stored.name)
    assert stored.token_hash == hash_token(issued.secret)
    found = await find_valid_token(session, issued.secret)
    assert found is not None
    assert found.user_id == u.id
    assert await find_valid_token(session, issued.secret + "x") is None
    assert await find_valid_token(session, "") is None


async def test_revoked_expired_and_used_up_tokens_are_refused(session: AsyncSession) -> None:
    now = utcnow()
    revoked = await issue_token(session, kind=TokenKind.USER)
    revoked.row.revoked_at = now
    expired = await issue_token(
        session, kind=TokenKind.USER, ttl_s=60, now=now - timedelta(hours=1)
    )
    used = await issue_token(session, kind=TokenKind.JOIN, uses_left=0)
    live_join = await issue_token(session, kind=TokenKind.JOIN, uses_left=1, ttl_s=60)
    await session.commit()
    for t in (revoked, expired, used):
        assert await find_valid_token(session, t.secret, now=now) is None
    assert await find_valid_token(session, live_join.secret, now=now) is not None
