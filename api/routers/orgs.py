"""`/v1/orgs` and `/v1/shares`: the organisation tree, shares, quotas and fair-share standing.

Everyone sees their own org and the orgs below it; platform admins see and change everything.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from api.deps import PlatformAdmin, Principal, SessionDep, UserPrincipal
from api.schemas.common import GpuType
from api.schemas.orgs import (
    OrgCreate,
    OrgPublic,
    OrgsPublic,
    OrgUpdate,
    QuotaPublic,
    QuotaSet,
    SharePublic,
    SharesPublic,
)
from scheduler.db import Org
from scheduler.db.types import utcnow
from scheduler.services import orgs as svc
from scheduler.services.errors import NotFound
from scheduler.services.shares import standings
from scheduler.services.tenantlimits import SubmitLimits
from scheduler.settings import Settings

router = APIRouter(tags=["orgs"])

OrgRef = Annotated[str, Path(max_length=63, description="Org name or id.")]


def _scope(principal: Principal) -> int | None:
    if principal.is_platform_admin:
        return None
    return principal.org_id if principal.org_id is not None else -1


def _public(view: svc.OrgView, limits: SubmitLimits) -> OrgPublic:
    o = view.org
    # Past the caller's tenant wall the company's configuration is its own: left null.
    settings = _settings(view, limits) if view.settings_shown else {}
    return OrgPublic(
        id=o.id,
        name=o.name,
        parent_id=o.parent_id,
        path=view.path,
        depth=view.depth,
        shares=o.shares,
        tenant=o.tenant,
        created_at=o.created_at,
        quotas=[QuotaPublic.model_validate(q) for q in view.quotas],
        settings_hidden=not view.settings_shown,
        **settings,
    )


def _settings(view: svc.OrgView, limits: SubmitLimits) -> dict[str, Any]:
    """The org's own configuration, with the server's defaults where it sets none."""
    o = view.org
    return {
        "default_time_limit_s": o.default_time_limit_s,
        "require_isolation": o.require_isolation,
        "isolation_required": view.isolation_required,
        "require_private_network": o.require_private_network,
        "private_network_required": o.private_network_required,
        "image_patterns": list(o.image_patterns or []),
        "max_priority_class": o.max_priority_class or limits.default_max_priority_class,
        "max_pending_jobs": (
            o.max_pending_jobs
            if o.max_pending_jobs is not None
            else limits.max_pending_jobs_per_org
        ),
        "interactive_max_time_s": (
            view.interactive_max_time_s
            if view.interactive_max_time_s is not None
            else limits.interactive_max_time_s
        ),
        "interactive_idle_timeout_s": (
            view.interactive_idle_timeout_s
            if view.interactive_idle_timeout_s is not None
            else limits.interactive_idle_timeout_s
        ),
    }


async def _visible_view(session: SessionDep, principal: Principal, ref: str) -> svc.OrgView:
    org = await svc.find_org(session, ref)
    for view in await svc.list_orgs(session, scope_org_id=_scope(principal)):
        if view.org.id == org.id:
            return view
    raise NotFound(f"org {ref!r} not found")


@router.get("/v1/orgs")
async def list_orgs(request: Request, session: SessionDep, principal: UserPrincipal) -> OrgsPublic:
    """The organisation tree in depth-first order (`path`, `depth`, `parent_id`), with quotas."""
    views = await svc.list_orgs(session, scope_org_id=_scope(principal))
    return OrgsPublic(
        data=[_public(v, request.app.state.submit_limits) for v in views], count=len(views)
    )


@router.post("/v1/orgs", status_code=201)
async def create_org(
    request: Request, body: OrgCreate, session: SessionDep, principal: PlatformAdmin
) -> OrgPublic:
    """Create an organisation, optionally under a parent (platform admins): a tenant of its
    own unless `tenant` is false (a group of its parent's tenant)."""
    org = await svc.create_org(
        session,
        name=body.name,
        parent=body.parent,
        shares=body.shares,
        default_time_limit_s=body.default_time_limit,
        tenant=body.tenant,
        actor=principal.actor,
    )
    await session.commit()
    request.app.state.runtime.notify("org")
    return _public(
        await _visible_view(session, principal, str(org.id)), request.app.state.submit_limits
    )


@router.get("/v1/orgs/{org}")
async def get_org(
    request: Request, org: OrgRef, session: SessionDep, principal: UserPrincipal
) -> OrgPublic:
    """One organisation with its quotas."""
    return _public(await _visible_view(session, principal, org), request.app.state.submit_limits)


@router.patch("/v1/orgs/{org}")
async def update_org(
    request: Request, org: OrgRef, body: OrgUpdate, session: SessionDep, principal: PlatformAdmin
) -> OrgPublic:
    """Change shares (fair-share weight), the default time limit, whether the org's jobs need
    nodes with strict isolation (`require_isolation`, inherited by the orgs below it), whether
    every one-node job of it runs in a network of its own (`require_private_network`, inherited
    by the orgs below it: `network: host` is then refused for one with 422), or the
    images its jobs may use (`image_patterns`, fnmatch; [] allows any), the highest priority
    class its members may submit at (`max_priority_class`) or its cap on pending jobs
    (`max_pending_jobs`); null for either returns it to the server's default; or the longest
    time limit of its interactive jobs (`interactive_max_time`, inherited by the orgs below it
    that set none; null returns to the parent's or the server's), or how long its interactive
    jobs may sit idle, with no input and no GPU use, before they end
    (`interactive_idle_timeout`, 0: never; inherited and reset as the maximum), or whether it
    is a tenant of its own (`tenant`: true, a company, which the orgs above it see only in
    aggregates; false, a group of its parent's tenant) (platform admins).

    A narrower image list refuses new submissions only; jobs already accepted keep running.
    """
    request.app.state.submit_limits.check_class(body.max_priority_class)
    row: Org = await svc.find_org(session, org)
    await svc.update_org(
        session,
        row,
        shares=body.shares,
        default_time_limit_s=body.default_time_limit,
        require_isolation=body.require_isolation,
        require_private_network=body.require_private_network,
        image_patterns=body.image_patterns,
        max_priority_class=body.max_priority_class,
        max_pending_jobs=body.max_pending_jobs,
        interactive_max_time_s=body.interactive_max_time,
        interactive_idle_timeout_s=body.interactive_idle_timeout,
        tenant=body.tenant,
        fields=set(body.model_fields_set),
        actor=principal.actor,
    )
    await session.commit()
    request.app.state.runtime.notify("org")
    return _public(
        await _visible_view(session, principal, str(row.id)), request.app.state.submit_limits
    )


@router.delete("/v1/orgs/{org}", status_code=204)
async def delete_org(
    request: Request, org: OrgRef, session: SessionDep, principal: PlatformAdmin
) -> None:
    """Delete an organisation with no child orgs, users or jobs left (409 otherwise)."""
    row = await svc.find_org(session, org)
    await svc.delete_org(session, row, actor=principal.actor)
    await session.commit()
    request.app.state.runtime.notify("org")


@router.get("/v1/orgs/{org}/quota")
async def get_quota(
    org: OrgRef, session: SessionDep, principal: UserPrincipal
) -> list[QuotaPublic]:
    """The org's quota per GPU type."""
    view = await _visible_view(session, principal, org)
    return [QuotaPublic.model_validate(q) for q in view.quotas]


@router.put("/v1/orgs/{org}/quota/{gpu_type}")
async def set_quota(
    request: Request,
    org: OrgRef,
    gpu_type: Annotated[GpuType, Path()],
    body: QuotaSet,
    session: SessionDep,
    principal: PlatformAdmin,
) -> QuotaPublic:
    """Set guaranteed GPUs and the limit for one GPU type (platform admins).

    Refused (409) when the children's guarantees would exceed the parent's, or a limit would
    exceed the parent's limit.
    """
    row = await svc.find_org(session, org)
    quota = await svc.set_quota(
        session,
        row,
        gpu_type=gpu_type,
        guaranteed=body.guaranteed,
        limit=body.limit,
        actor=principal.actor,
    )
    await session.commit()
    request.app.state.runtime.notify("quota")
    return QuotaPublic.model_validate(quota)


@router.get("/v1/shares")
async def shares(request: Request, session: SessionDep, principal: UserPrincipal) -> SharesPublic:
    """Fair-share standing of each visible org: shares, normalised shares, decayed usage,
    factor, and when the factor will be back at 0.5 if the org uses nothing more."""
    settings: Settings = request.app.state.settings
    scope = _scope(principal)
    visible = None
    if scope is not None:
        visible = {v.org.id for v in await svc.list_orgs(session, scope_org_id=scope)}
    now = utcnow()
    rows = await standings(
        session, config=settings.policy.to_policy_config(), org_ids=visible, now=now
    )
    return SharesPublic(
        data=[SharePublic.model_validate(r) for r in rows],
        half_life_s=settings.policy.half_life_s,
        as_of=now,
    )
