"""Bearer tokens: random, shown once, stored as SHA-256, revocable, with an expiry.

Tokens carry 256 bits of randomness, so a plain SHA-256 is enough to store them (there is
nothing to brute-force the way there is with passwords), and a lookup by hash is a single
indexed query. The prefix (`fg_u_`, `fg_a_`, `fg_j_`) tells a human, and secret scanners,
what kind of credential leaked.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import ApiToken
from scheduler.db.types import utcnow
from scheduler.states import TokenKind

_PREFIX = {TokenKind.USER: "fg_u_", TokenKind.AGENT: "fg_a_", TokenKind.JOIN: "fg_j_"}
SHOWN_PREFIX_CHARS = 12


# A token's `last_used_at` is refreshed at most this often: a busy token is not a write per use.
LAST_USED_RESOLUTION = timedelta(seconds=300)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedToken:
    row: ApiToken
    secret: str  # shown to the caller once, never stored


async def issue_token(
    session: AsyncSession,
    *,
    kind: TokenKind,
    name: str = "",
    user_id: int | None = None,
    node_id: int | None = None,
    site_id: int | None = None,
    created_by_user_id: int | None = None,
    ttl_s: float | None = None,
    uses_left: int | None = None,
    now: datetime | None = None,
) -> IssuedToken:
    """Create a token row and return it with its secret. The caller commits."""
    now = now or utcnow()
    secret = _PREFIX[kind] + secrets.token_urlsafe(32)
    row = ApiToken(
        kind=kind,
        name=name,
        token_hash=hash_token(secret),
        prefix=secret[:SHOWN_PREFIX_CHARS],
        user_id=user_id,
        node_id=node_id,
        site_id=site_id,
        created_by_user_id=created_by_user_id,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s) if ttl_s is not None else None,
        uses_left=uses_left,
    )
    session.add(row)
    await session.flush()
    return IssuedToken(row=row, secret=secret)


async def find_valid_token(
    session: AsyncSession, secret: str, *, now: datetime | None = None
) -> ApiToken | None:
    """The live token row for `secret`, or None (unknown, revoked, expired or used up)."""
    if not secret or len(secret) > 256:
        return None
    digest = hash_token(secret)
    row = await session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    # Constant-time comparison of what we found against what we computed: the index lookup
    # already matched, this keeps the final decision free of timing differences.
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    now = now or utcnow()
    if row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return None
    if row.uses_left is not None and row.uses_left <= 0:
        return None
    return row


async def credential_live(session: AsyncSession, token_hash: str, now: datetime) -> bool:
    """The credential with this hash is neither revoked nor expired (a held long-poll's check)."""
    row = (
        await session.execute(
            select(ApiToken.id, ApiToken.expires_at).where(
                ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None)
            )
        )
    ).one_or_none()
    return row is not None and (row.expires_at is None or row.expires_at > now)
