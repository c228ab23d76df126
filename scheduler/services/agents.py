"""Node registration: a join token creates a node, a node credential refreshes its own.

The heartbeat, the protocol's other use case, is scheduler/services/heartbeat/. The protocol
contract is in protocol/agent.py.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.agent import (
    AgentRegister,
    AgentRegistered,
)
from protocol.states import GpuHealth
from scheduler.db import ApiToken, Event, Gpu, LogChunk, Site, Task
from scheduler.db import Node as NodeRow
from scheduler.db.engine import dialect_insert
from scheduler.db.types import utcnow
from scheduler.services.errors import Conflict, Forbidden, Unauthenticated
from scheduler.services.tokens import find_valid_token, issue_token
from scheduler.settings import Settings
from scheduler.states import NodeState, TokenKind

_LOGS: Table = LogChunk.__table__  # type: ignore[assignment]
_TASKS: Table = Task.__table__  # type: ignore[assignment]
_SITES: Table = Site.__table__  # type: ignore[assignment]


# -- register ----------------------------------------------------------------------------------


async def register_node(
    session: AsyncSession,
    *,
    join_secret: str,
    body: AgentRegister,
    settings: Settings,
    now: datetime | None = None,
) -> AgentRegistered:
    """Create a node with a join token, or refresh one with its own credential.

    A join token only ever creates new nodes: registering an existing name with one is refused,
    unless a platform admin approved a takeover of that node (`fairgpu node approve`), which it
    then uses up. An agent that still holds its credential re-registers with it. Either way the
    node's earlier credentials are revoked and a new one, valid `node_credential_ttl_s`, issued.
    """
    now = now or utcnow()
    token = await find_valid_token(session, join_secret, now=now)
    if token is None or token.kind not in (TokenKind.JOIN, TokenKind.AGENT):
        raise Unauthenticated("not a valid join token or node credential")
    if token.kind is TokenKind.AGENT:
        node = await session.get(NodeRow, token.node_id) if token.node_id else None
        if node is None or node.name != body.name:
            raise Forbidden("a node credential re-registers only its own node")
        site = await session.get(Site, node.site_id)
        assert site is not None
        if site.name != body.site:
            raise Conflict(f"node {body.name!r} is registered at site {site.name!r}")
        return await _registered(session, node, site, body, settings, now, token.created_by_user_id)
    if token.uses_left is not None:
        used = await session.execute(
            update(ApiToken)
            .where(ApiToken.id == token.id, ApiToken.uses_left > 0)
            .values(uses_left=ApiToken.uses_left - 1)
            .execution_options(synchronize_session=False)
        )
        if getattr(used, "rowcount", 0) != 1:
            raise Unauthenticated("join token used up")
    site = await session.scalar(select(Site).where(Site.name == body.site))
    if token.site_id is not None and (site is None or site.id != token.site_id):
        raise Forbidden(f"this join token is not for site {body.site!r}")
    if site is None:
        site = await _create_site(session, body.site, now)
    node = await session.scalar(select(NodeRow).where(NodeRow.name == body.name))
    if node is None:
        node = NodeRow(name=body.name, site_id=site.id, registered_at=now, state=NodeState.READY)
        session.add(node)
    elif node.site_id != site.id:
        raise Conflict(f"node {body.name!r} is registered at another site")
    elif node.takeover_approved_until is None or node.takeover_approved_until <= now:
        raise Conflict(
            f"node {body.name!r} is already registered; a join token only creates new nodes. "
            "Re-register with the node's current credential, or have a platform admin run "
            f"`fairgpu node approve {body.name}` and register again with a join token",
            node=body.name,
        )
    else:
        node.takeover_approved_until = None  # the approval is used up
        session.add(
            Event(
                at=now,
                kind="node.takeover",
                node_id=node.id,
                actor=f"join-token:{token.id}",
                reason="re-registered with a join token, as approved",
            )
        )
    return await _registered(session, node, site, body, settings, now, token.created_by_user_id)


async def _registered(
    session: AsyncSession,
    node: NodeRow,
    site: Site,
    body: AgentRegister,
    settings: Settings,
    now: datetime,
    created_by_user_id: int | None,
) -> AgentRegistered:
    node.domain = body.domain
    node.hostname = body.hostname
    node.address = body.address
    node.agent_version = body.agent_version
    node.isolation = body.isolation
    node.capabilities = body.capabilities
    node.memory_per_gpu_bytes = body.memory_per_gpu_bytes
    node.last_heartbeat_at = now
    await session.flush()
    await _register_gpus(session, node, body, now)
    credential = await issue_node_credential(
        session, node, site_id=site.id, settings=settings, now=now, by=created_by_user_id
    )
    session.add(
        Event(
            at=now,
            kind="node.register",
            node_id=node.id,
            actor=f"agent:{node.id}",
            details={"isolation": body.isolation},
        )
    )
    return AgentRegistered(
        node_id=node.id,
        node_name=node.name,
        credential=credential,
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )


async def issue_node_credential(
    session: AsyncSession,
    node: NodeRow,
    *,
    site_id: int,
    settings: Settings,
    now: datetime,
    by: int | None = None,
    keep_token_id: int | None = None,
) -> str:
    """A new credential for the node; every other live one is revoked, but `keep_token_id`
    (the one a renewing heartbeat presented: it stays valid until the agent uses the new one
    or it expires, so a lost reply locks nobody out)."""
    await session.execute(
        update(ApiToken)
        .where(
            ApiToken.node_id == node.id,
            ApiToken.kind == TokenKind.AGENT,
            ApiToken.revoked_at.is_(None),
            ApiToken.id != (keep_token_id or 0),
        )
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    issued = await issue_token(
        session,
        kind=TokenKind.AGENT,
        name=f"node {node.name}",
        node_id=node.id,
        site_id=site_id,
        created_by_user_id=by,
        ttl_s=settings.node_credential_ttl_s,
        now=now,
    )
    return issued.secret


async def _create_site(session: AsyncSession, name: str, now: datetime) -> Site:
    """The site, created unless an agent registering at the same moment created it first.

    ON CONFLICT DO NOTHING then SELECT: on PostgreSQL the insert waits for the other
    transaction and the select (a new statement under READ COMMITTED) sees its row; on SQLite
    writers are serialised, so the other row is committed before this insert runs.
    """
    await session.execute(
        dialect_insert(session, _SITES).values(name=name, created_at=now).on_conflict_do_nothing()
    )
    site = await session.scalar(
        select(Site).where(Site.name == name).execution_options(populate_existing=True)
    )
    if site is None:  # sites are never deleted; only a concurrent manual delete gets here
        raise Conflict(f"site {name!r} changed during registration; retry")
    return site


async def _register_gpus(
    session: AsyncSession, node: NodeRow, body: AgentRegister, now: datetime
) -> None:
    existing = {
        g.index: g for g in await session.scalars(select(Gpu).where(Gpu.node_id == node.id))
    }
    reported = set()
    for info in body.gpus:
        reported.add(info.index)
        gpu = existing.get(info.index)
        if gpu is None:
            gpu = Gpu(node_id=node.id, index=info.index, health=GpuHealth.HEALTHY)
            session.add(gpu)
        elif gpu.health is GpuHealth.LOST:
            gpu.health = GpuHealth.HEALTHY  # it is back on the bus
            gpu.health_reason = None
        gpu.uuid = info.uuid
        gpu.model = info.model
        gpu.memory_bytes = info.memory_bytes
    for index, gpu in existing.items():
        if index not in reported and gpu.health is not GpuHealth.LOST:
            gpu.health = GpuHealth.LOST
            gpu.health_reason = f"not reported when the agent registered at {now.isoformat()}"
    await session.flush()
