"""The simulated cluster: node spec parsing, and tenants turned into organisations."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.core.types import Node, Org
from scheduler.sim.trace import Quota, TraceError

DEFAULT_GPU_TYPE = "H100"
DEFAULT_SITE = "sim"
DEFAULT_DOMAINS = 2  # the default cluster spreads over a couple of topology domains

_GROUP = re.compile(
    r"^(?:(?P<site>[\w.-]+):)?(?P<nodes>\d+)x(?P<gpus>\d+)(?:x(?P<type>[\w.-]+))?"
    r"(?:/(?P<domains>\d+))?$"
)


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """`nodes` identical servers of `gpus_per_node` GPUs, split evenly over `domains`."""

    site: str
    nodes: int
    gpus_per_node: int
    gpu_type: str
    domains: int = 1


def parse_cluster_spec(spec: str) -> list[NodeGroup]:
    """Parse `[SITE:]NODESxGPUS[xTYPE][/DOMAINS]`, comma-separated: `a:176x8xH100/2,b:8x4xA100`."""
    groups: list[NodeGroup] = []
    for part in (p.strip() for p in spec.split(",")):
        match = _GROUP.match(part)
        if not match:
            raise TraceError(f"bad cluster group {part!r}: want [SITE:]NODESxGPUS[xTYPE][/DOMAINS]")
        nodes, gpus = int(match["nodes"]), int(match["gpus"])
        domains = int(match["domains"] or 1)
        if nodes < 1 or gpus < 1 or not 1 <= domains <= nodes:
            raise TraceError(f"bad cluster group {part!r}: counts must be positive")
        site = match["site"] or DEFAULT_SITE
        groups.append(NodeGroup(site, nodes, gpus, match["type"] or DEFAULT_GPU_TYPE, domains))
    return groups


def default_cluster(quotas: Sequence[Quota], gpus_per_node: int = 8) -> list[NodeGroup]:
    """One node per `gpus_per_node` guaranteed GPUs of each type, as the quotas describe it."""
    totals: dict[str, int] = {}
    for q in quotas:
        gpu_type = q.gpu_type or DEFAULT_GPU_TYPE
        totals[gpu_type] = totals.get(gpu_type, 0) + q.gpus
    groups = []
    for gpu_type, total in totals.items():
        nodes = max(1, -(-total // gpus_per_node))
        domains = min(DEFAULT_DOMAINS, nodes)
        groups.append(NodeGroup(DEFAULT_SITE, nodes, gpus_per_node, gpu_type, domains))
    return groups


def check_quotas(quotas: Sequence[Quota], groups: Sequence[NodeGroup], source: str) -> list[str]:
    """Refuse quotas the cluster cannot hold as written; warn of oversubscribed types.

    A quota without a type on a cluster of several types, or of a type the cluster lacks, is an
    error naming `source` and the line; guarantees of one type above its capacity are allowed
    (the simulation shows what that does) and returned as warnings.
    """
    capacity = type_capacity(groups)
    types = ", ".join(sorted(capacity))
    guaranteed: dict[str, int] = {}
    for q in quotas:
        if q.gpu_type is None and len(capacity) > 1:
            raise TraceError(
                f"{source}:{q.line}: quota of {q.tenant} names no gpu_type, "
                f"and the cluster has several ({types})"
            )
        gpu_type = q.gpu_type or next(iter(capacity))
        if gpu_type not in capacity:
            raise TraceError(
                f"{source}:{q.line}: quota of {q.tenant} is for {gpu_type}, "
                f"which the cluster lacks (it has {types})"
            )
        guaranteed[gpu_type] = guaranteed.get(gpu_type, 0) + q.gpus
    return [
        f"{source}: guarantees of {t} add up to {g:,} GPUs, "
        f"above the cluster's {capacity[t]:,} {t} GPUs"
        for t, g in sorted(guaranteed.items())
        if g > capacity[t]
    ]


def type_capacity(groups: Sequence[NodeGroup]) -> dict[str, int]:
    """GPUs of each type in the cluster."""
    capacity: dict[str, int] = {}
    for g in groups:
        capacity[g.gpu_type] = capacity.get(g.gpu_type, 0) + g.nodes * g.gpus_per_node
    return capacity


def fit_guarantees(
    quotas: Sequence[Quota], groups: Sequence[NodeGroup]
) -> tuple[list[Quota], dict[str, float]]:
    """Guarantees of each type that exceed its capacity, scaled down in proportion to fit it.

    Guarantees that sum beyond the cluster cannot all be honoured, so a run with them measures
    nothing about keeping them (`--fit-guarantees`; docs/SIMULATION.md). Each type's guarantees
    are multiplied by capacity ÷ their sum and rounded by largest remainder, so they add up to
    the capacity exactly. A tenant's shares stay what its written guarantees gave it, so fair
    share orders tenants as before and only what each may claim as guaranteed changes. Returns
    the quotas and, for each type scaled, its factor. `quotas` must already pass check_quotas.
    """
    capacity = type_capacity(groups)
    only_type = next(iter(capacity))
    totals: dict[str, int] = {}
    for q in quotas:
        totals[q.gpu_type or only_type] = totals.get(q.gpu_type or only_type, 0) + q.gpus
    factors = {t: capacity[t] / total for t, total in totals.items() if total > capacity[t]}
    if not factors:
        return list(quotas), {}
    exact = [q.gpus * factors.get(q.gpu_type or only_type, 1.0) for q in quotas]
    fitted = [math.floor(x) for x in exact]
    for gpu_type in factors:
        rows = [i for i, q in enumerate(quotas) if (q.gpu_type or only_type) == gpu_type]
        short = capacity[gpu_type] - sum(fitted[i] for i in rows)
        for i in sorted(rows, key=lambda i: (fitted[i] - exact[i], i))[:short]:
            fitted[i] += 1
    shares: dict[str, float] = {}
    for q in quotas:
        if q.shares is None and q.tenant not in shares:
            written = sum(r.gpus for r in quotas if r.tenant == q.tenant)
            given = (r.shares for r in quotas if r.tenant == q.tenant and r.shares is not None)
            shares[q.tenant] = next(given, float(max(written, 1)))
    scaled = [
        dataclasses.replace(q, gpus=gpus, shares=shares.get(q.tenant, q.shares))
        for q, gpus in zip(quotas, fitted, strict=True)
    ]
    return scaled, factors


def build_nodes(groups: Sequence[NodeGroup]) -> tuple[Node, ...]:
    nodes: list[Node] = []
    for group in groups:
        per_domain = -(-group.nodes // group.domains)
        indices = tuple(range(group.gpus_per_node))
        for i in range(group.nodes):
            node_id = len(nodes) + 1
            nodes.append(
                Node(
                    id=node_id,
                    name=f"{group.site}-n{node_id:04d}",
                    site=group.site,
                    domain=f"{group.site}-d{i // per_domain}",
                    gpu_type=group.gpu_type,
                    gpus=indices,
                )
            )
    return tuple(nodes)


def build_orgs(
    quotas: Sequence[Quota], extra_tenants: Sequence[str], default_gpu_type: str
) -> tuple[Org, ...]:
    """Flat orgs, one per tenant: guarantees and limits per type from its rows, and shares as
    given or else proportional to its guaranteed GPUs.

    A tenant that submits jobs but has no quota gets no guarantee and a token share (one
    GPU's worth), so it runs only on idle GPUs it borrows.
    """
    rows: dict[str, list[Quota]] = {}
    for q in quotas:
        rows.setdefault(q.tenant, []).append(q)
    orgs = []
    for i, (tenant, own) in enumerate(rows.items()):
        given = next((q.shares for q in own if q.shares is not None), None)
        orgs.append(
            Org(
                id=i + 1,
                name=tenant,
                shares=given if given is not None else float(max(sum(q.gpus for q in own), 1)),
                guaranteed={q.gpu_type or default_gpu_type: q.gpus for q in own},
                limit={q.gpu_type or default_gpu_type: q.limit for q in own if q.limit is not None},
            )
        )
    for tenant in sorted(set(extra_tenants) - set(rows)):
        orgs.append(Org(id=len(orgs) + 1, name=tenant, shares=1.0, guaranteed={}))
    return tuple(orgs)


def gang_shape(num_gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(GPUs per node, nodes) for a job: one node when it fits, else the fewest equal tasks."""
    if num_gpus <= gpus_per_node:
        return num_gpus, 1
    nodes = -(-num_gpus // gpus_per_node)
    while num_gpus % nodes:
        nodes += 1
    return num_gpus // nodes, nodes
