"""`/v1/nodes`: the machines, their GPUs and health; platform admins drain, resume, approve,
revoke and delete them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, Response

from api.deps import PlatformAdmin, Principal, SessionDep, UserPrincipal
from api.schemas.common import MAX_NAME_CHARS, MAX_PAGE_SIZE
from api.schemas.nodes import DrainRequest, GpuPublic, NodeApproved, NodePublic, NodesPublic
from protocol.states import GpuHealth
from scheduler.db import Gpu
from scheduler.db.types import utcnow
from scheduler.services import nodeidentity as identity
from scheduler.services import nodes as svc
from scheduler.services.errors import NotFound

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])

NodeId = Annotated[int, Path(gt=0, lt=2**31)]


def _gpu(view: svc.NodeView, gpu: Gpu, viewer: Principal) -> GpuPublic:
    """Another org's job on a GPU is shown as "allocated", without its id or the GPU's sample:
    its utilisation, memory and power over time are that org's training (the model's size, its
    progress), which a member polling the node read before."""
    job_id = view.allocated.get(gpu.id)
    ours = job_id is not None and viewer.can_see_org(view.allocated_orgs.get(gpu.id))
    theirs = job_id is not None and not ours
    sample = None if theirs else gpu.last_sample
    return GpuPublic(
        id=gpu.id,
        index=gpu.index,
        uuid=gpu.uuid,
        model=gpu.model,
        memory_bytes=gpu.memory_bytes,
        health=gpu.health,
        health_reason=gpu.health_reason,
        allocated=job_id is not None,
        allocated_job_id=job_id if ours else None,
        last_sample=sample,
        last_sample_at=None if theirs else gpu.last_sample_at,
    )


def _public(view: svc.NodeView, viewer: Principal) -> NodePublic:
    n = view.node
    gpus = [_gpu(view, g, viewer) for g in view.gpus]
    return NodePublic(
        id=n.id,
        name=n.name,
        site=view.site,
        domain=n.domain,
        state=n.state,
        state_reason=n.state_reason,
        hostname=n.hostname,
        agent_version=n.agent_version,
        isolation=n.isolation,
        memory_per_gpu_bytes=n.memory_per_gpu_bytes,
        registered_at=n.registered_at,
        last_heartbeat_at=n.last_heartbeat_at,
        gpus=gpus,
        gpus_total=len(gpus),
        gpus_allocated=sum(1 for g in gpus if g.allocated),
        gpus_healthy=sum(1 for g in gpus if g.health is GpuHealth.HEALTHY),
    )


async def _one(session: SessionDep, node_id: int, viewer: Principal) -> NodePublic:
    views = await svc.list_nodes(session, node_id)
    if not views:
        raise NotFound(f"node {node_id} not found")
    return _public(views[0], viewer)


@router.get("")
async def list_nodes(
    session: SessionDep,
    principal: UserPrincipal,
    name: Annotated[str | None, Query(max_length=MAX_NAME_CHARS)] = None,
    cursor: Annotated[str | None, Query(max_length=MAX_NAME_CHARS)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = MAX_PAGE_SIZE,
) -> NodesPublic:
    """Every node (or the one called `name`) with its GPUs, their health, and the job of the
    caller's org on each GPU (other orgs' jobs show only as allocated GPUs), by name: `limit`
    a page, `next_cursor` goes on. Pages, because every member may ask, and a pool of
    thousands of nodes made each answer megabytes."""
    views = await svc.list_nodes(session, name=name, after_name=cursor, limit=limit + 1)
    more = len(views) > limit
    views = views[:limit]
    return NodesPublic(
        data=[_public(v, principal) for v in views],
        count=len(views),
        next_cursor=views[-1].node.name if more else None,
    )


@router.get("/{node_id}")
async def get_node(node_id: NodeId, session: SessionDep, principal: UserPrincipal) -> NodePublic:
    """One node."""
    return await _one(session, node_id, principal)


@router.post("/{node_id}/drain")
async def drain_node(
    request: Request,
    node_id: NodeId,
    session: SessionDep,
    principal: PlatformAdmin,
    body: Annotated[DrainRequest | None, Body()] = None,
) -> NodePublic:
    """Stop placing work on the node; running tasks finish (platform admins)."""
    node = await svc.get_node(session, node_id)
    reason = body.reason if body else DrainRequest().reason
    await svc.drain_node(session, node, reason=reason, actor=principal.actor)
    await session.commit()
    request.app.state.runtime.notify("drain")
    return await _one(session, node_id, principal)


@router.post("/{node_id}/resume")
async def resume_node(
    request: Request, node_id: NodeId, session: SessionDep, principal: PlatformAdmin
) -> NodePublic:
    """Put a draining or drained node back in service (platform admins)."""
    node = await svc.get_node(session, node_id)
    await svc.resume_node(session, node, actor=principal.actor)
    await session.commit()
    request.app.state.runtime.notify("resume")
    return await _one(session, node_id, principal)


@router.post("/{node_id}/approve")
async def approve_node(
    request: Request, node_id: NodeId, session: SessionDep, principal: PlatformAdmin
) -> NodeApproved:
    """Let the next registration of this node's name with a join token take the node over,
    once, within a join token's lifetime: for an agent that lost its credential (platform
    admins). Without it a join token only creates new nodes."""
    node = await svc.get_node(session, node_id)
    until = await identity.approve_takeover(
        session, node, actor=principal.actor, now=utcnow(), settings=request.app.state.settings
    )
    await session.commit()
    return NodeApproved(node_id=node.id, name=node.name, approved_until=until)


@router.post("/{node_id}/revoke")
async def revoke_node(
    request: Request, node_id: NodeId, session: SessionDep, principal: PlatformAdmin
) -> NodePublic:
    """Revoke the node's credential at once (held heartbeats end with 401) and handle it as a
    lost node: down, its tasks NODE_FAIL, preemptible jobs requeued (platform admins)."""
    node = await svc.get_node(session, node_id)
    effects = await identity.revoke_node(
        session, node, actor=principal.actor, now=utcnow(), settings=request.app.state.settings
    )
    await session.commit()
    request.app.state.auth_cache.clear()
    runtime = request.app.state.runtime
    runtime.wake_nodes({node_id, *effects.wake_nodes})
    runtime.notify("node revoked")
    return await _one(session, node_id, principal)


@router.delete("/{node_id}", status_code=204)
async def delete_node(
    request: Request, node_id: NodeId, session: SessionDep, principal: PlatformAdmin
) -> Response:
    """Remove a drained or down node with no running task, with its GPUs and credentials; its
    history stays (platform admins). 409 while it runs tasks."""
    node = await svc.get_node(session, node_id)
    await identity.delete_node(session, node)
    await session.commit()
    request.app.state.auth_cache.clear()
    request.app.state.runtime.wake_nodes({node_id})
    return Response(status_code=204)
