"""Billing-weighted usage with exponential decay, and the fair-share factor built on it.

Usage is GPU-seconds x the GPU type's billing weight, decayed with a half-life so that old usage
counts less (Slurm's `PriorityDecayHalfLife`). The fair-share factor is Slurm's classic
`F = 2^(-U/S)`, with `S` the org's shares normalised along the tree and `U` its subtree usage
normalised by the decayed usage of the whole cluster running flat out (see docs/SCHEDULING.md for
why the cluster, and not the sum of everyone's usage, is the yardstick).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from scheduler.core.types import Node, Org, PolicyConfig, Snapshot, UsageInterval

LN2 = math.log(2.0)


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    """Weight left after `elapsed_s` of decay."""
    if half_life_s <= 0:
        return 0.0 if elapsed_s > 0 else 1.0
    return float(2.0 ** (-max(0.0, elapsed_s) / half_life_s))


def interval_usage(
    gpus: int, weight: float, start: float, end: float, now: float, half_life_s: float
) -> float:
    """Decayed usage at `now` of `gpus` held from `start` to `end`: the integral of the decay."""
    if end <= start or gpus <= 0:
        return 0.0
    if half_life_s <= 0:
        return 0.0 if end < now else gpus * weight * (end - start)
    tau = half_life_s / LN2
    return (
        gpus
        * weight
        * tau
        * (decay_factor(now - end, half_life_s) - decay_factor(now - start, half_life_s))
    )


def decay_usage(
    previous: Mapping[int, float],
    previous_at: float,
    intervals: Iterable[UsageInterval],
    now: float,
    *,
    half_life_s: float = PolicyConfig().half_life_s,
    gpu_weights: Mapping[str, float] | None = None,
) -> dict[int, float]:
    """Org id → decayed usage at `now`, folding `intervals` into usage last folded at `previous_at`.

    Only the part of each interval after `previous_at` (and up to `now`) is added, so that a
    running allocation can be passed every cycle with `end=now` without double counting.
    """
    weights = gpu_weights or {}
    keep = decay_factor(now - previous_at, half_life_s)
    out = {org_id: value * keep for org_id, value in previous.items()}
    for iv in intervals:
        start = max(iv.start, previous_at)
        end = min(iv.end, now)
        add = interval_usage(iv.gpus, weights.get(iv.gpu_type, 1.0), start, end, now, half_life_s)
        if add > 0:
            out[iv.org_id] = out.get(iv.org_id, 0.0) + add
    return out


def capacity_usage(nodes: Iterable[Node], config: PolicyConfig) -> float:
    """Decayed usage of the whole cluster busy forever: the yardstick of normalised usage."""
    weights = config.gpu_weights
    total = sum(len(n.gpus) * weights.get(n.gpu_type, 1.0) for n in nodes)
    if config.half_life_s <= 0:
        return float(total)
    return total * config.half_life_s / LN2


def fairshare_factor(usage_norm: float, shares_norm: float) -> float:
    """Slurm's classic factor: 1 unused, 0.5 at exactly its share, towards 0 above it."""
    if shares_norm <= 0:
        return 0.0
    return float(2.0 ** (-usage_norm / shares_norm))


class TreeShares:
    """What `tree_standing` needs from the org tree alone: ids, the post-order walk, shares.

    It follows from the orgs' ids, parents and shares (and their order, for a repeated id), so a
    `Scheduler` keeps it while those are unchanged; only usage is read anew each cycle.
    """

    __slots__ = ("ids", "shares_norm", "ups")

    def __init__(self, orgs: Iterable[Org]) -> None:
        by_id: dict[int, Org] = {}
        for o in sorted(orgs, key=lambda o: o.id):  # id order: float sums independent of input
            by_id.setdefault(o.id, o)
        children: dict[int | None, list[int]] = {}
        for o in by_id.values():
            parent = o.parent_id if o.parent_id in by_id else None
            children.setdefault(parent, []).append(o.id)
        # Post-order accumulation; a depth guard ignores cycles in a malformed tree.
        order: list[int] = []
        stack: list[tuple[int | None, int]] = [(None, 0)]
        seen: set[int] = set()
        while stack:
            oid, depth = stack.pop()
            if oid is not None:
                order.append(oid)
            if depth > 64:
                continue
            for child in children.get(oid, ()):
                if child not in seen:
                    seen.add(child)
                    stack.append((child, depth + 1))
        shares_norm: dict[int, float] = {}
        # Each parent's children's shares summed once (in the same order, so the same float),
        # not once per child: a flat tree of N orgs would otherwise cost N² steps.
        totals: dict[int | None, float] = {}
        for oid in order:
            o = by_id[oid]
            parent = o.parent_id if o.parent_id in by_id else None
            total = totals.get(parent)
            if total is None:
                siblings = children.get(parent, ())
                total = totals[parent] = sum(max(0.0, by_id[s].shares) for s in siblings)
            own = max(0.0, o.shares) / total if total > 0 else 0.0
            shares_norm[oid] = own * (shares_norm.get(parent, 1.0) if parent is not None else 1.0)
        self.ids = list(by_id)  # id order
        # (child, parent) in reverse post-order: subtree usage adds up from the leaves.
        self.ups: list[tuple[int, int]] = []
        for oid in reversed(order):
            parent = by_id[oid].parent_id
            if parent in by_id and parent is not None:
                self.ups.append((oid, parent))
        for oid in by_id:
            shares_norm.setdefault(oid, 0.0)
        self.shares_norm = shares_norm


def tree_standing(
    orgs: Iterable[Org], cap_usage: float, shares: TreeShares | None = None
) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """(shares_norm, usage_norm, factor) per org id, along the tree.

    `shares_norm` is the product along the path of shares ÷ siblings' shares; `usage_norm` is the
    org's subtree usage ÷ the cluster's capacity usage. `shares`: kept from an earlier cycle
    whose orgs had these ids, parents and shares, in this order (`Scheduler` checks); None
    builds it.
    """
    if shares is None:
        orgs = list(orgs)
        shares = TreeShares(orgs)
    usage: dict[int, float] = {}
    for o in orgs:  # the first org of an id, as `TreeShares` takes it (a stable sort)
        if o.id not in usage:
            usage[o.id] = o.usage
    ids = shares.ids
    subtree_usage = {oid: max(0.0, usage[oid]) for oid in ids}
    for oid, parent in shares.ups:
        subtree_usage[parent] += subtree_usage[oid]
    usage_norm = {oid: (subtree_usage[oid] / cap_usage if cap_usage > 0 else 0.0) for oid in ids}
    shares_norm = shares.shares_norm
    factor = {oid: fairshare_factor(usage_norm[oid], shares_norm[oid]) for oid in ids}
    return dict(shares_norm), usage_norm, factor


def fair_tree_factors(
    orgs: Iterable[Org], shares_norm: Mapping[int, float], usage_norm: Mapping[int, float]
) -> dict[int, float]:
    """Slurm's Fair Tree: rank orgs depth first, siblings by level fair share, factor from rank.

    Among siblings, level fair share is (shares ÷ siblings' shares) ÷ (usage ÷ siblings' usage);
    higher goes first (ties: org id). Walking the tree depth first in that order ranks every org,
    an org before its children; the factor is (N − rank + 1) ÷ N, so 1 for the most deserving.
    A whole subtree that over-used ranks below a sibling subtree that did not, whatever happens
    inside it: the isolation between programmes that Fair Tree was built for.
    """
    by_id: dict[int, Org] = {}
    for o in sorted(orgs, key=lambda o: o.id):
        by_id.setdefault(o.id, o)
    children: dict[int | None, list[int]] = {}
    for o in by_id.values():
        parent = o.parent_id if o.parent_id in by_id else None
        children.setdefault(parent, []).append(o.id)

    def level_fs(siblings: list[int]) -> dict[int, float]:
        s_total = sum(max(0.0, by_id[x].shares) for x in siblings)
        u_total = sum(usage_norm.get(x, 0.0) for x in siblings)
        out = {}
        for x in siblings:
            s = max(0.0, by_id[x].shares) / s_total if s_total > 0 else 0.0
            u = usage_norm.get(x, 0.0) / u_total if u_total > 0 else 0.0
            out[x] = math.inf if u == 0 and s > 0 else (s / u if u > 0 else 0.0)
        return out

    ranked: list[int] = []
    stack: list[tuple[int, int]] = []
    roots = children.get(None, [])
    lf = level_fs(roots)
    for x in sorted(roots, key=lambda x: (-lf[x], x), reverse=True):
        stack.append((x, 0))
    seen: set[int] = set()
    while stack:
        oid, depth = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        ranked.append(oid)
        kids = children.get(oid, [])
        if kids and depth < 64:
            lf = level_fs(kids)
            for x in sorted(kids, key=lambda x: (-lf[x], x), reverse=True):
                stack.append((x, depth + 1))
    n = len(ranked)
    return {oid: (n - i) / n for i, oid in enumerate(ranked)}


def recovery_time(snapshot: Snapshot, org_id: int, target_factor: float) -> float | None:
    """When the org's fair-share factor climbs back to `target_factor` if it uses nothing more.

    Returns `snapshot.now` when it is already there, None when it never can (no shares, or a
    target of 1 or more with some usage left). Other orgs' usage does not move the answer,
    because usage is normalised by the cluster's capacity, not by everyone's usage.
    """
    cap = capacity_usage(snapshot.nodes, snapshot.config)
    shares_norm, usage_norm, factor = tree_standing(snapshot.orgs, cap)
    if org_id not in factor:
        return None
    if factor[org_id] >= target_factor:
        return snapshot.now
    s = shares_norm[org_id]
    if s <= 0 or target_factor >= 1.0 or target_factor <= 0 or snapshot.config.half_life_s <= 0:
        return None
    # F(t) = 2^(-u·2^(-t/h)/s) = target  ⇔  t = h·log2(u / (s·(-log2 target)))
    needed = s * -math.log2(target_factor)
    return snapshot.now + snapshot.config.half_life_s * math.log2(usage_norm[org_id] / needed)
