"""Fair-share standing per org, computed with the scheduling core's own helpers.

The numbers users see are the ones the scheduler orders jobs by: the same decay, the same
normalisation by the cluster's capacity, the same factor (scheduler.core.usage).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import GpuHealth
from scheduler.core import types as core
from scheduler.core.usage import (
    capacity_usage,
    decay_factor,
    fair_tree_factors,
    recovery_time,
    tree_standing,
)
from scheduler.db import Gpu, Node, Org, OrgUsage
from scheduler.db.types import utcnow
from scheduler.states import NodeState

TARGET_FACTOR = 0.5  # "recovered": back at its fair share


@dataclass(frozen=True, slots=True)
class Standing:
    org_id: int
    org: str
    parent_id: int | None
    shares: float
    shares_norm: float
    decayed_usage_gpu_s: float
    usage_norm: float
    fairshare_factor: float
    recovers_at: datetime | None
    recover_s: float | None


async def _cluster_nodes(session: AsyncSession) -> tuple[core.Node, ...]:
    rows = (
        await session.execute(
            select(
                Node.id,
                Node.name,
                Node.domain,
                Node.state,
                Gpu.index.label("gpu_index"),
                Gpu.model,
                Gpu.health,
            )
            .join(Gpu, Gpu.node_id == Node.id)
            .order_by(Node.id, Gpu.index)
        )
    ).all()
    grouped: dict[int, list[tuple[int, str, GpuHealth]]] = {}
    meta: dict[int, tuple[str, str, NodeState]] = {}
    for r in rows:
        grouped.setdefault(r.id, []).append((r.gpu_index, r.model, r.health))
        meta[r.id] = (r.name, r.domain, r.state)
    nodes = []
    for node_id, gpus in grouped.items():
        name, domain, state = meta[node_id]
        nodes.append(
            core.Node(
                id=node_id,
                name=name,
                site="",
                domain=domain,
                gpu_type=gpus[0][1],
                gpus=tuple(g[0] for g in gpus),
                schedulable=state is NodeState.READY,
            )
        )
    return tuple(nodes)


async def standings(
    session: AsyncSession,
    *,
    config: core.PolicyConfig,
    org_ids: set[int] | None = None,
    now: datetime | None = None,
) -> list[Standing]:
    """Every org's standing (or those in `org_ids`); the tree is always computed whole.

    The factor is the configured algorithm's (`config.fairshare_algorithm`). Under Fair Tree an
    org's factor is its rank among its siblings, which moves with their usage too: there is no
    recovery time to give, and `recovers_at` / `recover_s` stay empty.
    """
    now = now or utcnow()
    now_s = now.timestamp()
    usage = {
        u.org_id: u.decayed_gpu_seconds
        * decay_factor(now_s - u.as_of.timestamp(), config.half_life_s)
        for u in (await session.scalars(select(OrgUsage))).all()
    }
    orgs = (await session.scalars(select(Org).order_by(Org.id))).all()
    core_orgs = tuple(
        core.Org(
            id=o.id,
            name=o.name,
            parent_id=o.parent_id,
            shares=o.shares,
            usage=usage.get(o.id, 0.0),
        )
        for o in orgs
    )
    snapshot = core.Snapshot(
        now=now_s, nodes=await _cluster_nodes(session), orgs=core_orgs, config=config
    )
    shares_norm, usage_norm, factor = tree_standing(
        core_orgs, capacity_usage(snapshot.nodes, config)
    )
    fair_tree = config.fairshare_algorithm == "fairtree"
    if fair_tree:
        factor = fair_tree_factors(core_orgs, shares_norm, usage_norm)
    out = []
    for o in orgs:
        if org_ids is not None and o.id not in org_ids:
            continue
        at = None if fair_tree else recovery_time(snapshot, o.id, TARGET_FACTOR)
        recover_s = None if at is None else max(0.0, at - now_s)
        out.append(
            Standing(
                org_id=o.id,
                org=o.name,
                parent_id=o.parent_id,
                shares=o.shares,
                shares_norm=shares_norm.get(o.id, 0.0),
                decayed_usage_gpu_s=usage.get(o.id, 0.0),
                usage_norm=usage_norm.get(o.id, 0.0),
                fairshare_factor=factor.get(o.id, 0.0),
                recovers_at=None
                if at is None or recover_s == 0.0
                else datetime.fromtimestamp(at, UTC),
                recover_s=recover_s,
            )
        )
    return out
