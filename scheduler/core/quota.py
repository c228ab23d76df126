"""The org tree's allocation books: guarantees (nominal quota), limits and borrowing per GPU type.

An org's allocation counts its whole subtree. A job is *in quota* when its org's subtree stays
within the org's guarantee for that GPU type (and so does every ancestor that has a guarantee for
it); otherwise it *borrows*, which only preemptible jobs may do, and never beyond any `limit` on
the path to the root. Kueue's ClusterQueue nominal quota / borrowingLimit, with cohorts as the tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from scheduler.core.types import Org, RunningJob

_NEVER = 1 << 62  # more GPUs than any job asks for


class Paths:
    """Each org's path to the root, and who on it sets a limit or a guarantee.

    They follow from the orgs' ids, parents, limits and guarantees alone, so a `Scheduler`
    keeps them while those are unchanged (usage changes every cycle; these rarely do).
    """

    __slots__ = ("children", "guarded", "limited", "path")

    def __init__(self, orgs: Mapping[int, Org]) -> None:
        self.path: dict[int, tuple[int, ...]] = {}
        for oid in orgs:
            chain = [oid]
            parent = orgs[oid].parent_id
            while parent is not None and parent in orgs and parent not in chain:
                chain.append(parent)
                parent = orgs[parent].parent_id
            # A malformed tree (a parent cycle) must not make orgs charge each other: such an
            # org stands alone.
            self.path[oid] = (oid,) if parent is not None and parent in chain else tuple(chain)
        # Only orgs that set a limit or a guarantee need looking at on the way up.
        self.limited = {
            oid: tuple(a for a in chain if orgs[a].limit) for oid, chain in self.path.items()
        }
        self.guarded = {
            oid: tuple(a for a in chain[1:] if any(v > 0 for v in orgs[a].guaranteed.values()))
            for oid, chain in self.path.items()
        }
        self.children: dict[int, list[int]] = {}
        for oid, up in self.path.items():
            if len(up) > 1:
                self.children.setdefault(up[1], []).append(oid)


class OrgBooks:
    def __init__(
        self, orgs: Iterable[Org], capacity: dict[str, int], paths: Paths | None = None
    ) -> None:
        """`paths`: kept from an earlier cycle whose orgs had these ids, parents, limits and
        guarantees (`Scheduler` checks that); None builds them."""
        self.orgs: dict[int, Org] = {}
        for o in orgs:
            self.orgs.setdefault(o.id, o)
        self.capacity = capacity
        if paths is None:
            paths = Paths(self.orgs)
        self.path = paths.path
        self.limited = paths.limited
        self.guarded = paths.guarded
        self.children = paths.children
        self.alloc: dict[int, dict[str, int]] = {oid: {} for oid in self.orgs}
        # GPUs of jobs being preempted (sent before or this cycle): leaving, not yet gone.
        self.leaving: dict[int, dict[str, int]] = {oid: {} for oid in self.orgs}
        self._no_quota: dict[tuple[int, str], int] = {}  # (org, type) → fewest GPUs out of quota

    def add(self, org_id: int, gpu_type: str, gpus: int) -> None:
        for a in self.path.get(org_id, ()):
            book = self.alloc[a]
            book[gpu_type] = book.get(gpu_type, 0) + gpus

    def add_leaving(self, org_id: int, gpu_type: str, gpus: int) -> None:
        for a in self.path.get(org_id, ()):
            book = self.leaving[a]
            book[gpu_type] = book.get(gpu_type, 0) + gpus

    def add_running(self, running: Iterable[RunningJob], gpus: Iterable[int]) -> None:
        """Book running jobs (`gpus`: each one's GPU count), summed per org before the walk up."""
        held: dict[tuple[int, str], int] = {}
        leaving: dict[tuple[int, str], int] = {}
        for r, n in zip(running, gpus, strict=True):
            key = (r.org_id, r.gpu_type)
            held[key] = held.get(key, 0) + n
            if r.preempting:
                leaving[key] = leaving.get(key, 0) + n
        self.add_totals(held, leaving)

    def add_totals(
        self, held: dict[tuple[int, str], int], leaving: dict[tuple[int, str], int]
    ) -> None:
        """Book GPUs held (and of those, leaving) per (org, GPU type)."""
        for (org_id, t), n in held.items():
            self.add(org_id, t, n)
        for (org_id, t), n in leaving.items():
            self.add_leaving(org_id, t, n)

    def in_quota(self, org_id: int, gpu_type: str, gpus: int) -> bool:
        """The job fits in its org's unused guarantee (and its guaranteed ancestors')."""
        # Allocations only grow while the books live (one cycle): a size that did not fit
        # never fits again, nor does a larger one. Most jobs of a busy cluster stop here.
        key = (org_id, gpu_type)
        if gpus >= self._no_quota.get(key, _NEVER):
            return False
        own = self.orgs[org_id].guaranteed.get(gpu_type, 0)
        fits = self.alloc[org_id].get(gpu_type, 0) + gpus <= own
        if fits:
            for a in self.guarded[org_id]:
                g = self.orgs[a].guaranteed.get(gpu_type)
                if g is not None and g > 0 and self.alloc[a].get(gpu_type, 0) + gpus > g:
                    fits = False
                    break
        if not fits:
            self._no_quota[key] = gpus
        return fits

    def limit_block(self, org_id: int, gpu_type: str, gpus: int) -> int | None:
        """The org on the path whose `limit` this job would break, or None."""
        for a in self.limited[org_id]:
            lim = self.orgs[a].limit.get(gpu_type)
            if lim is not None and self.alloc[a].get(gpu_type, 0) + gpus > lim:
                return a
        return None

    def limit_never(self, org_id: int, gpu_type: str, gpus: int) -> int | None:
        """The org whose `limit` is below the job's size: it can never start."""
        for a in self.limited[org_id]:
            lim = self.orgs[a].limit.get(gpu_type)
            if lim is not None and gpus > lim:
                return a
        return None

    def over(self, org_id: int, gpu_type: str) -> int:
        """GPUs the org holds beyond its guarantee, not counting those already leaving."""
        held = self.alloc[org_id].get(gpu_type, 0) - self.leaving[org_id].get(gpu_type, 0)
        return max(0, held - self.orgs[org_id].guaranteed.get(gpu_type, 0))

    def weighted_share(self, org_id: int, gpu_type: str, delta: int = 0) -> float:
        """Borrowed GPUs ÷ the type's capacity ÷ shares (Kueue's weighted share, per GPU type)."""
        o = self.orgs[org_id]
        cap = self.capacity.get(gpu_type, 0)
        if cap <= 0:
            return 0.0
        held = self.alloc[org_id].get(gpu_type, 0) - self.leaving[org_id].get(gpu_type, 0)
        over = max(0, held + delta - o.guaranteed.get(gpu_type, 0))
        if over == 0:
            return 0.0
        if o.shares <= 0:
            return float("inf")
        return over / cap / o.shares

    def dominant_share(self, org_id: int) -> float:
        """The largest weighted share over GPU types: borrowing goes to the lowest first."""
        return max((self.weighted_share(org_id, t) for t in self.capacity), default=0.0)

    def in_quota_after(self, org_id: int, gpu_type: str, gpus: int, freed: int) -> bool:
        """In quota once `freed` GPUs of the org's own jobs (and all leaving ones) are gone."""
        for a in self.path[org_id]:
            g = self.orgs[a].guaranteed.get(gpu_type)
            if a != org_id and (g is None or g <= 0):
                continue
            held = self.alloc[a].get(gpu_type, 0) - self.leaving[a].get(gpu_type, 0) - freed
            if held + gpus > (g or 0):
                return False
        return True

    def headroom(self, org_id: int, gpu_type: str) -> int:
        return self.orgs[org_id].guaranteed.get(gpu_type, 0) - self.alloc[org_id].get(gpu_type, 0)
