"""Backfill reservations: the blocked jobs at the head get the nodes that free up first for them.

EASY backfill after Slurm: for a head job that cannot start, walk each candidate node's release
profile (running jobs end at the latest at their time limit) to the moment it has enough GPUs,
take the k nodes of one site that get there first, and withhold from the free index every GPU
those nodes will not have to spare at that moment. Lower jobs then only see capacity that cannot
delay the reservation.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from scheduler.core.capacity import FreeIndex
from scheduler.core.types import PendingJob, RunningJob


class Reservations:
    def __init__(
        self,
        index: FreeIndex,
        running: tuple[RunningJob, ...],
        now: float,
        drains: Mapping[int, float],
    ) -> None:
        """`drains`: per node, when its last running job ends (its time limit, or its preemption
        deadline), gathered in the cycle's one pass over the running jobs; earlier than `now`
        for a job past its limit."""
        self.index = index
        self.now = now
        self._running = running
        self._releases: dict[int, list[tuple[float, int]]] | None = None
        self._late: list[tuple[int, int, float]] = []
        self._drains = drains
        self._late_drains: dict[int, float] = {}  # node → the latest end of this cycle's starts
        self.reserved: dict[int, tuple[float, int]] = {}  # node → (start, job id)
        self.protected: set[int] = set()  # nodes reserved for protected gangs: never reclaimed
        self.holder: dict[str, int] = {}  # GPU type → first job holding a reservation on it
        self.count = 0
        self.hidden: dict[int, int] = {}  # node → GPUs withheld for its reservation
        self.latest = float("-inf")  # the latest reservation start: longer jobs never fit short
        self._short_failed: dict[tuple[str, str | None, int, int, int], float] = {}

    def note_start(self, nid: int, gpus: int, end: float) -> None:
        """A job started this cycle: its GPUs come back at `end`."""
        late = self._late_drains
        if nid not in late or end > late[nid]:
            late[nid] = end
        if self._releases is None:
            self._late.append((nid, gpus, end))
        else:
            bisect.insort(self._releases.setdefault(nid, []), (end, gpus))

    def _build(self) -> dict[int, list[tuple[float, int]]]:
        rel: dict[int, list[tuple[float, int]]] = {}
        now = self.now
        for r in self._running:
            end = r.preempt_deadline if r.preempting and r.preempt_deadline else r.expected_end
            end = max(end, now)
            for p in r.placements:
                rel.setdefault(p.node_id, []).append((end, len(p.gpus)))
        for nid, gpus, end in self._late:
            rel.setdefault(nid, []).append((end, gpus))
        for lst in rel.values():
            lst.sort()
        self._releases = rel
        return rel

    def drains_at(self, nid: int) -> float:
        """When the last job running on the node ends (at its time limit); now if none runs.

        The last entry of the node's release profile, without building the profiles:
        `pack_by_end` asks this of every partly used node, and most cycles reserve nothing.
        """
        drain = self._drains.get(nid, self.now)
        late = self._late_drains.get(nid, drain)
        return max(drain, late, self.now)

    def reserve(
        self, job: PendingJob, gpu_type: str, *, protected: bool = False
    ) -> tuple[float, list[int]] | None:
        """Reserve nodes for the job; returns (start time, nodes) or None if none ever free.

        `protected`: a protected gang's nodes, which reclaim plans then leave alone.
        """
        rel = self._releases if self._releases is not None else self._build()
        index = self.index
        gpn, k, site = job.gpus_per_node, job.nodes, job.site
        need = index.job_class(job)
        free = index.free
        nodes = index.nodes
        by_site: dict[str, list[tuple[float, int]]] = {}
        for nid in index.by_type.get(gpu_type, ()):
            if nid in self.reserved:
                continue
            node = nodes[nid]
            if (site is not None and node.site != site) or (need and not index.in_class(nid, need)):
                continue
            have = free[nid]
            when = self.now
            if have < gpn:
                for end, g in rel.get(nid, ()):
                    have += g
                    if have >= gpn:
                        when = end
                        break
                else:
                    continue
            by_site.setdefault(node.site, []).append((when, nid))
        best: tuple[float, str] | None = None
        for s, lst in by_site.items():
            if len(lst) < k:
                continue
            lst.sort()
            cand = (lst[k - 1][0], s)
            if best is None or cand < best:
                best = cand
        if best is None:
            return None
        start, s = best
        chosen = [nid for _, nid in by_site[s][:k]]
        for nid in chosen:
            spare = free[nid] - gpn
            for end, g in rel.get(nid, ()):
                if end > start:
                    break
                spare += g
            keep = max(0, min(free[nid], spare))
            self.hidden[nid] = index.hide(nid, free[nid] - keep)
            self.reserved[nid] = (start, job.job_id)
            if protected:
                self.protected.add(nid)
        self.holder.setdefault(gpu_type, job.job_id)
        self.count += 1
        self.latest = max(self.latest, start)
        return start, chosen

    def short_fit(self, job: PendingJob, gpu_type: str, end: float) -> list[int] | None:
        """Reserved nodes whose withheld GPUs a job ending before the reservation may use."""
        if end > self.latest:
            return None
        gpn, k, site = job.gpus_per_node, job.nodes, job.site
        index = self.index
        need = index.job_class(job)
        key = (gpu_type, site, gpn, k, need)
        if self._short_failed.get(key, float("inf")) <= end:
            return None
        by_site: dict[str, list[tuple[int, int]]] = {}
        for nid, (start, _holder) in self.reserved.items():
            node = index.nodes[nid]
            if (
                start < end
                or node.gpu_type != gpu_type
                or (site is not None and node.site != site)
                or (need and not index.in_class(nid, need))
            ):
                continue
            room = index.free[nid] + self.hidden.get(nid, 0)
            if room >= gpn:
                by_site.setdefault(node.site, []).append((room - gpn, nid))
        for s in sorted(by_site):
            lst = by_site[s]
            if len(lst) >= k:
                lst.sort()
                return [nid for _, nid in lst[:k]]
        self._short_failed[key] = end
        return None

    def take_short(self, nid: int, gpus: int) -> tuple[int, ...]:
        """Allocate on a reserved node, from its free GPUs first, then from the withheld ones."""
        from_hidden = max(0, gpus - self.index.free[nid])
        self.hidden[nid] -= from_hidden
        return self.index.allocate_withheld(nid, gpus)
