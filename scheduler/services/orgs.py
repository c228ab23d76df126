"""Organisation tree and quota use cases.

A child's guarantees fit inside its parent's: for every GPU type, the children's guaranteed
GPUs add up to at most the parent's, and a child's limit is at most its parent's. Both sides of
that rule are checked whenever a quota changes, so the tree can never be put into a state the
scheduler would have to second-guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Event, Job, Org, Quota, User
from scheduler.db.types import utcnow
from scheduler.services.errors import Conflict, InvalidInput, NotFound

MAX_TREE_DEPTH = 16


@dataclass(frozen=True, slots=True)
class OrgView:
    org: Org
    path: str
    depth: int
    quotas: list[Quota]
    isolation_required: bool = False  # set on it or on an ancestor
    interactive_max_time_s: int | None = None  # its own or its nearest ancestor's; None: none set
    interactive_idle_timeout_s: int | None = None  # the same, for the idle timeout
    # False past the caller's tenant wall: the org's settings are its company's own; the
    # caller sees its name, place, shares and quotas only (full_view_ids).
    settings_shown: bool = True


def nearest_set(values: Iterable[int | None]) -> int | None:
    """The first value that is set, walking from an org up to its root: a child without a
    setting of its own takes its parent's."""
    return next((v for v in values if v is not None), None)


async def find_org(session: AsyncSession, ref: str | int) -> Org:
    """By name, or by id when `ref` is all digits."""
    if isinstance(ref, int) or ref.isdigit():
        oid = int(ref)
        row = await session.get(Org, oid) if 0 < oid < 2**31 else None
    else:
        row = await session.scalar(select(Org).where(Org.name == ref))
    if row is None:
        raise NotFound(f"org {ref!r} not found")
    return row


async def org_id_of(session: AsyncSession, ref: str) -> int | None:
    """The id of the org `ref` names (by name, or by id when all digits); None when none does.
    For callers that must answer alike whether or not another org exists."""
    ref = ref.strip()
    if ref.isdigit():
        oid = int(ref)
        if not 0 < oid < 2**31:
            return None
        return await session.scalar(select(Org.id).where(Org.id == oid))
    return await session.scalar(select(Org.id).where(Org.name == ref))


async def all_orgs(session: AsyncSession) -> list[Org]:
    return list((await session.scalars(select(Org).order_by(Org.id))).all())


def subtree_ids(orgs: Sequence[Org], root_id: int) -> set[int]:
    """`root_id` and every org below it."""
    return _reach(orgs, root_id, lambda _child: True)


def full_view_ids(orgs: Sequence[Org], root_id: int) -> set[int]:
    """`root_id` and the orgs below it that its people see in full: those reached without
    passing a tenant wall. An org marked `tenant` (a company, the default) is a tenant of its
    own: the orgs above it see it, and everything below it, only in aggregates (usage by org
    and GPU type, standing, counts), never its people's names or its jobs. An org that is not
    (a group) belongs to its parent's tenant, whose people see it in full."""
    return _reach(orgs, root_id, lambda child: not child.tenant)


def _reach(orgs: Sequence[Org], root_id: int, enter: Callable[[Org], bool]) -> set[int]:
    """`root_id` and the orgs below it reached through children that `enter` lets in."""
    children: dict[int | None, list[Org]] = {}
    for o in orgs:
        children.setdefault(o.parent_id, []).append(o)
    out: set[int] = set()
    stack = [root_id]
    while stack:
        oid = stack.pop()
        if oid in out:
            continue
        out.add(oid)
        stack.extend(child.id for child in children.get(oid, ()) if enter(child))
    return out


async def list_orgs(session: AsyncSession, *, scope_org_id: int | None) -> list[OrgView]:
    """The tree in depth-first order; non-admins see their org and the orgs below it, and
    the settings of those within their tenant only."""
    orgs = await all_orgs(session)
    by_id = {o.id: o for o in orgs}
    visible = set(by_id) if scope_org_id is None else subtree_ids(orgs, scope_org_id)
    in_full = visible if scope_org_id is None else full_view_ids(orgs, scope_org_id)
    quotas: dict[int, list[Quota]] = {}
    for q in (await session.scalars(select(Quota).order_by(Quota.gpu_type))).all():
        quotas.setdefault(q.org_id, []).append(q)

    def lineage(o: Org) -> list[Org]:
        line = [o]
        seen = {o.id}
        while o.parent_id is not None and o.parent_id in by_id and o.parent_id not in seen:
            o = by_id[o.parent_id]
            seen.add(o.id)
            line.append(o)
        return line[::-1]

    views = [
        OrgView(
            o,
            "/".join(a.name for a in line),
            len(line) - 1,
            quotas.get(o.id, []),
            any(a.require_isolation for a in line),
            nearest_set(a.interactive_max_time_s for a in reversed(line)),
            nearest_set(a.interactive_idle_timeout_s for a in reversed(line)),
            o.id in in_full,
        )
        for o in orgs
        if o.id in visible
        for line in [lineage(o)]
    ]
    views.sort(key=lambda v: v.path)
    return views


async def create_org(
    session: AsyncSession,
    *,
    name: str,
    parent: str | None,
    shares: float,
    default_time_limit_s: int | None,
    tenant: bool = True,
    actor: str,
) -> Org:
    if await session.scalar(select(Org.id).where(Org.name == name)) is not None:
        raise Conflict(f"org {name!r} already exists")
    parent_id, inherited = None, False
    if parent is not None:
        parent_row = await find_org(session, parent)
        depth = len(await _ancestors(session, parent_row))
        if depth >= MAX_TREE_DEPTH:
            raise InvalidInput(f"the org tree may be at most {MAX_TREE_DEPTH} levels deep")
        parent_id = parent_row.id
        inherited = parent_row.private_network_required
    org = Org(
        name=name,
        parent_id=parent_id,
        shares=shares,
        default_time_limit_s=default_time_limit_s,
        private_network_required=inherited,
        tenant=tenant,
    )
    session.add(org)
    await session.flush()
    session.add(
        Event(
            kind="org.create",
            org_id=org.id,
            actor=actor,
            details={"parent_id": parent_id, "tenant": tenant},
        )
    )
    await session.flush()
    return org


async def _ancestors(session: AsyncSession, org: Org) -> list[Org]:
    out: list[Org] = []
    current = org
    while current.parent_id is not None and len(out) <= MAX_TREE_DEPTH:
        parent = await session.get(Org, current.parent_id)
        if parent is None:
            break
        out.append(parent)
        current = parent
    return out


async def update_org(
    session: AsyncSession,
    org: Org,
    *,
    shares: float | None,
    default_time_limit_s: int | None,
    require_isolation: bool | None = None,
    require_private_network: bool | None = None,
    image_patterns: list[str] | None = None,
    max_priority_class: str | None = None,
    max_pending_jobs: int | None = None,
    interactive_max_time_s: int | None = None,
    interactive_idle_timeout_s: int | None = None,
    tenant: bool | None = None,
    fields: set[str],
    actor: str,
) -> Org:
    """Change what `fields` names; a field sent as null leaves it as it is, except the default
    time limit, the two tenant limits and the interactive maximum and idle timeout, which null
    returns to the default (for the interactive two: its parent's, or the server's)."""
    changes: dict[str, object] = {}
    if "shares" in fields and shares is not None:
        org.shares = shares
        changes["shares"] = shares
    if "default_time_limit" in fields:
        org.default_time_limit_s = default_time_limit_s
        changes["default_time_limit_s"] = default_time_limit_s
    if "require_isolation" in fields and require_isolation is not None:
        org.require_isolation = require_isolation
        changes["require_isolation"] = require_isolation
    if "require_private_network" in fields and require_private_network is not None:
        org.require_private_network = require_private_network
        changes["require_private_network"] = require_private_network
        await _inherit_private_network(session, org)
    if "image_patterns" in fields and image_patterns is not None:
        org.image_patterns = list(dict.fromkeys(image_patterns))  # once each, in order
        changes["image_patterns"] = org.image_patterns
    if "max_priority_class" in fields:
        org.max_priority_class = max_priority_class
        changes["max_priority_class"] = max_priority_class
    if "max_pending_jobs" in fields:
        org.max_pending_jobs = max_pending_jobs
        changes["max_pending_jobs"] = max_pending_jobs
    if "interactive_max_time" in fields:
        org.interactive_max_time_s = interactive_max_time_s
        changes["interactive_max_time_s"] = interactive_max_time_s
    if "interactive_idle_timeout" in fields:
        org.interactive_idle_timeout_s = interactive_idle_timeout_s
        changes["interactive_idle_timeout_s"] = interactive_idle_timeout_s
    if "tenant" in fields and tenant is not None:
        org.tenant = tenant
        changes["tenant"] = tenant
    if changes:
        session.add(Event(kind="org.update", org_id=org.id, actor=actor, details=changes))
    await session.flush()
    return org


async def private_network_required(session: AsyncSession, org_id: int) -> bool:
    """Whether the org's one-node jobs must run in a network of their own."""
    required = await session.scalar(select(Org.private_network_required).where(Org.id == org_id))
    return bool(required)


async def _inherit_private_network(session: AsyncSession, changed: Org) -> None:
    """`private_network_required` of the changed org and every org below it: its own setting
    or its parent's (parents first, so each reads its parent's new value)."""
    orgs = await all_orgs(session)
    by_id = {o.id: o for o in orgs}
    children: dict[int | None, list[Org]] = {}
    for o in orgs:
        children.setdefault(o.parent_id, []).append(o)
    parent = by_id.get(changed.parent_id) if changed.parent_id is not None else None
    pending = [(changed, parent is not None and parent.private_network_required)]
    seen: set[int] = set()
    while pending:
        org, inherited = pending.pop()
        if org.id in seen:
            continue
        seen.add(org.id)
        org.private_network_required = org.require_private_network or inherited
        pending.extend((child, org.private_network_required) for child in children.get(org.id, []))


async def _guaranteed(session: AsyncSession, org_id: int, gpu_type: str) -> tuple[int, int | None]:
    row = await session.scalar(
        select(Quota).where(Quota.org_id == org_id, Quota.gpu_type == gpu_type)
    )
    return (row.guaranteed, row.limit) if row is not None else (0, None)


async def set_quota(
    session: AsyncSession,
    org: Org,
    *,
    gpu_type: str,
    guaranteed: int,
    limit: int | None,
    actor: str,
    now: datetime | None = None,
) -> Quota:
    """Set (or replace) the org's quota for one GPU type, keeping the tree consistent."""
    if limit is not None and limit < guaranteed:
        raise InvalidInput("limit must be at least guaranteed")
    if org.parent_id is not None:
        parent_guaranteed, parent_limit = await _guaranteed(session, org.parent_id, gpu_type)
        siblings = await session.scalar(
            select(func.coalesce(func.sum(Quota.guaranteed), 0))
            .join(Org, Org.id == Quota.org_id)
            .where(Org.parent_id == org.parent_id, Org.id != org.id, Quota.gpu_type == gpu_type)
        )
        if int(siblings or 0) + guaranteed > parent_guaranteed:
            raise Conflict(
                f"{gpu_type}: children of the parent would be guaranteed "
                f"{int(siblings or 0) + guaranteed} GPUs, more than the parent's "
                f"{parent_guaranteed}",
                parent_guaranteed=parent_guaranteed,
                siblings_guaranteed=int(siblings or 0),
            )
        if parent_limit is not None and (limit is None or limit > parent_limit):
            raise Conflict(
                f"{gpu_type}: limit must be at most the parent's limit of {parent_limit}",
                parent_limit=parent_limit,
            )
    children = await session.scalar(
        select(func.coalesce(func.sum(Quota.guaranteed), 0))
        .join(Org, Org.id == Quota.org_id)
        .where(Org.parent_id == org.id, Quota.gpu_type == gpu_type)
    )
    if int(children or 0) > guaranteed:
        raise Conflict(
            f"{gpu_type}: the org's children are guaranteed {int(children or 0)} GPUs; "
            f"its own guarantee cannot be less",
            children_guaranteed=int(children or 0),
        )
    if limit is not None:
        child_limit = await session.scalar(
            select(func.max(Quota.limit))
            .join(Org, Org.id == Quota.org_id)
            .where(Org.parent_id == org.id, Quota.gpu_type == gpu_type)
        )
        if child_limit is not None and child_limit > limit:
            raise Conflict(
                f"{gpu_type}: a child's limit is {child_limit}; the org's cannot be less",
                children_limit=int(child_limit),
            )
    row = await session.scalar(
        select(Quota).where(Quota.org_id == org.id, Quota.gpu_type == gpu_type)
    )
    now = now or utcnow()
    before = {"guaranteed": row.guaranteed, "limit": row.limit} if row is not None else None
    if row is None:
        row = Quota(org_id=org.id, gpu_type=gpu_type, guaranteed=guaranteed, limit=limit)
        session.add(row)
    else:
        row.guaranteed = guaranteed
        row.limit = limit
    row.updated_at = now
    session.add(
        Event(
            at=now,
            kind="quota",
            org_id=org.id,
            actor=actor,
            details={
                "gpu_type": gpu_type,
                "guaranteed": guaranteed,
                "limit": limit,
                "before": before,
            },
        )
    )
    await session.flush()
    return row


async def delete_org(session: AsyncSession, org: Org, *, actor: str) -> None:
    """Delete an org that nothing refers to any more: no child orgs, users or jobs."""
    for what, stmt in (
        ("child orgs", select(Org.id).where(Org.parent_id == org.id)),
        ("users", select(User.id).where(User.org_id == org.id)),
        ("jobs", select(Job.id).where(Job.org_id == org.id)),
    ):
        if await session.scalar(stmt.limit(1)) is not None:
            raise Conflict(f"org {org.name!r} still has {what}; remove them first")
    session.add(Event(kind="org.delete", actor=actor, details={"org": org.name, "id": org.id}))
    await session.delete(org)
    await session.flush()
