"""Server-side domain enumerations (job and GPU states shared with agents live in `protocol`)."""

from __future__ import annotations

from enum import StrEnum


class NodeState(StrEnum):
    READY = "ready"
    DRAINING = "draining"  # no new tasks; running tasks finish
    DRAINED = "drained"  # draining and empty
    DOWN = "down"  # missed heartbeats
    UNHEALTHY = "unhealthy"  # GPU errors


class Role(StrEnum):
    MEMBER = "member"
    ORG_ADMIN = "org-admin"
    PLATFORM_ADMIN = "platform-admin"


class TokenKind(StrEnum):
    USER = "user"  # a person's API token
    AGENT = "agent"  # a node's credential: speaks only the agent protocol for that node
    JOIN = "join"  # lets an agent register a new node
