"""Users, API tokens and join tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from api.schemas.common import (
    DurationS,
    InputModel,
    Name,
    OrgName,
    OutputModel,
    SiteName,
    UserName,
)
from scheduler.states import Role, TokenKind

MAX_TOKEN_TTL_S = 366 * 86_400
MAX_JOIN_USES = 100_000


class UserCreate(InputModel):
    name: UserName
    org: OrgName | None = None
    """The user's organisation; org admins may only create users in their own (the default)."""
    role: Role = Role.MEMBER


class UserPublic(OutputModel):
    id: int
    name: str
    org_id: int | None
    role: Role
    created_at: datetime
    disabled_at: datetime | None


class UsersPublic(OutputModel):
    data: list[UserPublic]
    count: int
    next_cursor: str | None = None


class TokenCreate(InputModel):
    name: Name = "token"
    ttl: Annotated[DurationS, Field(le=MAX_TOKEN_TTL_S)] | None = None
    """Lifetime; the server's default when omitted."""
    user_id: Annotated[int, Field(gt=0, lt=2**31)] | None = None
    """Issue for another user of the caller's org (org admins) or of any org (platform admins)."""


class TokenPublic(OutputModel):
    id: int
    kind: TokenKind
    name: str
    prefix: str
    """The first characters of the secret, to recognise it; the secret itself is never shown."""
    user_id: int | None
    node_id: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    uses_left: int | None = None


class TokenCreated(TokenPublic):
    token: str
    """The secret. Shown this once: store it now."""


class TokensPublic(OutputModel):
    data: list[TokenPublic]
    count: int
    next_cursor: str | None = None


class JoinTokenCreate(InputModel):
    name: Name = "join"
    site: SiteName | None = None
    """Restrict registration to this site (created when it does not exist)."""
    uses: Annotated[int, Field(ge=1, le=MAX_JOIN_USES)] = 1
    """How many nodes may register with it: one unless said (a leaked token then creates at
    most that many nodes, and never takes over an existing one)."""
    ttl: Annotated[DurationS, Field(le=MAX_TOKEN_TTL_S)] | None = None
