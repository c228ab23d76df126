"""What the heartbeat reads to classify it: the node's state and its active tasks, as named rows.

Two reads give the same rows: `read_node` on a session's connection (the routed heartbeat, its
caller already authenticated), and `read_by_credential` on the lean asyncpg pool (the direct
heartbeat on PostgreSQL, api/direct.py), which folds the credential check into the same
statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Table, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from scheduler.db import ApiToken, Node, Task
from scheduler.db.leanpool import LeanPool, Prepared
from scheduler.services.scheduling.tasks import ACTIVE_STATES
from scheduler.services.tokens import LAST_USED_RESOLUTION
from scheduler.states import TokenKind

_NODES: Table = Node.__table__  # type: ignore[assignment]
_TASKS: Table = Task.__table__  # type: ignore[assignment]
_TOKENS: Table = ApiToken.__table__  # type: ignore[assignment]


class NodeTaskRow(NamedTuple):
    """The node's state and one of its active tasks (all task fields None when it has none)."""

    node_state: str
    task_id: int | None
    task_state: str | None
    started: bool | None  # the agent has reported the task once
    stopping: bool | None  # a stop was requested


class AgentCredential(NamedTuple):
    """The presented credential, as the direct heartbeat reads it with the node."""

    kind: str
    node_id: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def usable_without_routing(self, now: datetime) -> bool:
        """A live agent credential whose `last_used_at` needs no refresh (authentication on
        the routed path refreshes it)."""
        return bool(
            self.kind == TokenKind.AGENT.value
            and self.node_id is not None
            and self.revoked_at is None
            and (self.expires_at is None or self.expires_at > now)
            and self.last_used_at is not None
            and now - self.last_used_at <= LAST_USED_RESOLUTION
        )


# A task of the node that holds GPUs on it (or is about to).
ACTIVE_TASK_OF_NODE = and_(
    _TASKS.c.node_id == _NODES.c.id,
    # Not IN (...): an expanding parameter is re-rendered on every execution.
    or_(*(_TASKS.c.state == state for state in ACTIVE_STATES)),
)
_NODE_TASK_COLUMNS = (
    _NODES.c.state,
    _TASKS.c.id,
    _TASKS.c.state,
    _TASKS.c.started_at.is_not(None),
    _TASKS.c.stop_requested_at.is_not(None),
)
_CREDENTIAL_COLUMNS = (
    _TOKENS.c.kind,
    _TOKENS.c.node_id,
    _TOKENS.c.expires_at,
    _TOKENS.c.revoked_at,
    _TOKENS.c.last_used_at,
)
_NODE_AND_TASKS = (
    select(*_NODE_TASK_COLUMNS)
    .select_from(_NODES.outerjoin(_TASKS, ACTIVE_TASK_OF_NODE))
    .where(_NODES.c.id == bindparam("node_id"))
)
_BY_CREDENTIAL = Prepared(
    select(*_NODE_TASK_COLUMNS, *_CREDENTIAL_COLUMNS)
    .select_from(
        _TOKENS.join(_NODES, _NODES.c.id == _TOKENS.c.node_id).outerjoin(
            _TASKS, ACTIVE_TASK_OF_NODE
        )
    )
    .where(_TOKENS.c.token_hash == bindparam("token_hash"))
)
_SPLIT = len(_NODE_TASK_COLUMNS)


async def read_node(conn: AsyncConnection, node_id: int) -> list[NodeTaskRow]:
    """The node's rows; empty when the node is not registered."""
    result = await conn.execute(_NODE_AND_TASKS, {"node_id": node_id})
    return [NodeTaskRow(*row) for row in result.all()]


class CredentialNode(NamedTuple):
    credential: AgentCredential
    node: Sequence[NodeTaskRow]


async def read_by_credential(pool: LeanPool, token_hash: str) -> CredentialNode | None:
    """The credential with this hash and its node's rows; None for an unknown credential or
    one that belongs to no node."""
    rows = await pool.run(
        "fetch", _BY_CREDENTIAL.sql, *_BY_CREDENTIAL.args({"token_hash": token_hash})
    )
    if not rows:
        return None
    credential = AgentCredential(*tuple(rows[0])[_SPLIT:])
    return CredentialNode(credential, [NodeTaskRow(*tuple(r)[:_SPLIT]) for r in rows])
