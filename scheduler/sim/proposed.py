"""The proposed quota set of a what-if: `org, gpu_type, guaranteed, limit[, shares]` CSV.

Each row sets one org's quota for one GPU type, as `fairgpu admin` would. An org named in the
file gets exactly the rows listed for it (types not listed: no guarantee, no limit); an org not
named keeps its recorded quotas and shares. `limit` may be empty (no limit beyond the cluster);
`shares`, where the column exists and the cell is filled, replaces the org's fair-share weight.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from scheduler.core.types import Org
from scheduler.sim.trace import TraceError

PROPOSED_COLUMNS = ("org", "gpu_type", "guaranteed", "limit")


@dataclass(frozen=True, slots=True)
class ProposedQuota:
    org: str
    gpu_type: str
    guaranteed: int
    limit: int | None
    shares: float | None
    line: int  # in the file, for errors that only the database can reveal


def _count(path: Path, line: int, column: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise TraceError(f"{path}:{line}: {column} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise TraceError(f"{path}:{line}: {column} must not be negative, got {value}")
    return value


def load_proposed_quotas(path: Path) -> list[ProposedQuota]:
    """Read and check the file on its own; `apply_quotas` checks it against the cluster."""
    rows: list[ProposedQuota] = []
    seen: set[tuple[str, str]] = set()
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in PROPOSED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise TraceError(
                f"{path}: missing column(s) {', '.join(missing)} "
                f"(want {', '.join(PROPOSED_COLUMNS)}[, shares])"
            )
        for line, row in enumerate(reader, start=2):
            org, gpu_type = (row["org"] or "").strip(), (row["gpu_type"] or "").strip()
            if not org or not gpu_type:
                raise TraceError(f"{path}:{line}: org and gpu_type must not be empty")
            guaranteed = _count(path, line, "guaranteed", (row["guaranteed"] or "").strip())
            raw_limit = (row["limit"] or "").strip()
            limit = _count(path, line, "limit", raw_limit) if raw_limit else None
            if limit is not None and limit < guaranteed:
                raise TraceError(
                    f"{path}:{line}: limit {limit} is below guaranteed {guaranteed} for {org}"
                )
            shares = _shares(path, line, (row.get("shares") or "").strip())
            if (org, gpu_type) in seen:
                raise TraceError(f"{path}:{line}: a second row for {org} {gpu_type}")
            seen.add((org, gpu_type))
            rows.append(ProposedQuota(org, gpu_type, guaranteed, limit, shares, line))
    if not rows:
        raise TraceError(f"{path}: no quotas")
    return rows


def _shares(path: Path, line: int, raw: str) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise TraceError(f"{path}:{line}: shares must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise TraceError(f"{path}:{line}: shares must be positive, got {raw}")
    return value


def apply_quotas(
    orgs: Sequence[Org], proposed: Iterable[ProposedQuota], gpu_types: set[str], path: Path
) -> tuple[Org, ...]:
    """The recorded orgs with the proposed quotas in place, checked as `set_quota` checks them."""
    by_name = {o.name: o for o in orgs}
    rows: dict[str, list[ProposedQuota]] = defaultdict(list)
    for quota in proposed:
        if quota.org not in by_name:
            raise TraceError(f"{path}:{quota.line}: unknown org {quota.org!r}")
        if quota.gpu_type not in gpu_types:
            known = ", ".join(sorted(gpu_types)) or "none"
            raise TraceError(
                f"{path}:{quota.line}: no {quota.gpu_type!r} GPUs in the cluster ({known})"
            )
        given = [q.shares for q in rows[quota.org] if q.shares is not None]
        if quota.shares is not None and given and given[0] != quota.shares:
            raise TraceError(f"{path}:{quota.line}: two different shares for {quota.org}")
        rows[quota.org].append(quota)
    out: list[Org] = []
    for org in orgs:
        mine = rows.get(org.name)
        if not mine:
            out.append(org)
            continue
        shares = next((q.shares for q in mine if q.shares is not None), org.shares)
        out.append(
            replace(
                org,
                shares=shares,
                guaranteed={q.gpu_type: q.guaranteed for q in mine},
                limit={q.gpu_type: q.limit for q in mine if q.limit is not None},
            )
        )
    _check_tree(out, path)
    return tuple(out)


def _check_tree(orgs: Sequence[Org], path: Path) -> None:
    """A child's guarantees fit inside its parent's, and its limit under the parent's limit."""
    by_id = {o.id: o for o in orgs}
    children: dict[int, list[Org]] = defaultdict(list)
    for org in orgs:
        if org.parent_id is not None and org.parent_id in by_id:
            children[org.parent_id].append(org)
    for parent_id, kids in children.items():
        parent = by_id[parent_id]
        for gpu_type in {t for k in kids for t in k.guaranteed}:
            total = sum(k.guaranteed.get(gpu_type, 0) for k in kids)
            if total > parent.guaranteed.get(gpu_type, 0):
                raise TraceError(
                    f"{path}: children of {parent.name} would be guaranteed {total} {gpu_type} "
                    f"GPUs, more than its {parent.guaranteed.get(gpu_type, 0)}"
                )
        for gpu_type, cap in parent.limit.items():
            for kid in kids:
                if kid.limit.get(gpu_type, cap + 1) > cap:
                    raise TraceError(
                        f"{path}: {kid.name}'s {gpu_type} limit must be at most its parent "
                        f"{parent.name}'s limit of {cap}"
                    )
