"""Index of free GPUs per type, site and domain: nodes counted by how many GPUs they have free.

A placement query costs O(distinct free counts x domains), never O(nodes): each level keeps
`cnt[f]` (how many nodes have exactly f free GPUs) and a lazy min-heap of node ids per f, so the
tightest node (best fit) with the lowest id comes out first. Within one cycle free GPUs only ever
go down (starts, claims, reservations), which keeps the lazy heaps and the "this shape failed"
memo valid.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from scheduler.core.types import Node


class Level:
    """Nodes of one (type), (type, site) or (type, site, domain), bucketed by free GPUs."""

    __slots__ = ("cnt", "heaps")

    def __init__(self, max_g: int) -> None:
        self.cnt = [0] * (max_g + 1)
        self.heaps: list[list[int]] = [[] for _ in range(max_g + 1)]

    def count_ge(self, g: int) -> int:
        return sum(self.cnt[g:])

    def waste(self, gpn: int, k: int) -> int:
        """Free GPUs left over on the k tightest nodes with ≥ gpn free (best-fit score)."""
        left = k
        waste = 0
        cnt = self.cnt
        for f in range(gpn, len(cnt)):
            take = cnt[f] if cnt[f] < left else left
            waste += take * (f - gpn)
            left -= take
            if not left:
                break
        return waste


class FreeIndex:
    def __init__(self, nodes: Iterable[Node], held: Mapping[int, set[int]]) -> None:
        node_list = sorted(nodes, key=lambda n: n.id)
        self.max_g = max((len(n.gpus) for n in node_list), default=0)
        self.nodes: dict[int, Node] = {}
        self.free_gpus: dict[int, list[int]] = {}
        self.free: dict[int, int] = {}
        self.levels: dict[tuple[str, ...], Level] = {}
        self.node_levels: dict[int, tuple[Level, Level, Level]] = {}
        self.type_sites: dict[str, list[str]] = {}
        self.site_domains: dict[tuple[str, str], list[str]] = {}
        self.capacity: dict[str, int] = {}  # every GPU of the type, usable or not
        # Static shape check: nodes by GPU count per (type, site), whatever their state.
        self.static: dict[tuple[str, str], list[int]] = {}
        max_g = self.max_g
        for n in node_list:
            if n.id in self.nodes:
                continue
            self.nodes[n.id] = n
            self.capacity[n.gpu_type] = self.capacity.get(n.gpu_type, 0) + len(n.gpus)
            st = self.static.setdefault((n.gpu_type, n.site), [0] * (max_g + 1))
            st[len(n.gpus)] += 1
            lt = self._level((n.gpu_type,))
            ls = self._level((n.gpu_type, n.site))
            ld = self._level((n.gpu_type, n.site, n.domain))
            self.node_levels[n.id] = (lt, ls, ld)
            if n.schedulable:
                busy = held.get(n.id, set())
                gpus = sorted(g for g in set(n.gpus) if g not in n.unhealthy_gpus and g not in busy)
            else:
                gpus = []
            self.free_gpus[n.id] = gpus
            f = len(gpus)
            self.free[n.id] = f
            for lvl in (lt, ls, ld):
                lvl.cnt[f] += 1
                if f:
                    lvl.heaps[f].append(n.id)  # ids ascend: already a heap
        for key in self.levels:
            if len(key) == 2:
                self.type_sites.setdefault(key[0], []).append(key[1])
            elif len(key) == 3:
                self.site_domains.setdefault((key[0], key[1]), []).append(key[2])
        for sites in self.type_sites.values():
            sites.sort()
        for domains in self.site_domains.values():
            domains.sort()
        self.types = sorted(self.capacity)
        self.by_type: dict[str, list[int]] = {}
        for n in node_list:
            if n.schedulable and self.nodes.get(n.id) is n:
                self.by_type.setdefault(n.gpu_type, []).append(n.id)
        self.hidden: dict[str, int] = {}  # GPUs withheld per type (claims, reservations)
        self.withheld: dict[int, list[int]] = {}  # node → GPU indices withheld

    def _level(self, key: tuple[str, ...]) -> Level:
        lvl = self.levels.get(key)
        if lvl is None:
            lvl = self.levels[key] = Level(self.max_g)
        return lvl

    # -- queries -----------------------------------------------------------------------------

    def possible(self, gpu_type: str, site: str | None, gpn: int, k: int) -> bool:
        """Could the cluster run this shape at all, were every node empty and healthy?"""
        if gpn > self.max_g or gpn <= 0 or k <= 0:
            return False
        sites = [site] if site is not None else self.type_sites.get(gpu_type, [])
        for s in sites:
            st = self.static.get((gpu_type, s))
            if st is not None and sum(st[gpn:]) >= k:
                return True
        return False

    def largest_gang(self, gpu_type: str, site: str | None, gpn: int) -> int:
        """Most nodes with ≥ gpn free GPUs inside one site now."""
        if gpn > self.max_g:
            return 0
        sites = [site] if site is not None else self.type_sites.get(gpu_type, [])
        best = 0
        for s in sites:
            lvl = self.levels.get((gpu_type, s))
            if lvl is not None:
                best = max(best, lvl.count_ge(gpn))
        return best

    def free_of_type(self, gpu_type: str) -> int:
        lvl = self.levels.get((gpu_type,))
        if lvl is None:
            return 0
        return sum(f * c for f, c in enumerate(lvl.cnt))

    def find(self, gpu_type: str, site: str | None, gpn: int, k: int) -> list[int] | None:
        """Nodes for a gang of k x gpn: one node, else one domain, else one site; best fit."""
        if gpn > self.max_g:
            return None
        top = self.levels.get((gpu_type,) if site is None else (gpu_type, site))
        if top is None or top.count_ge(gpn) < k:
            return None
        if k == 1:
            return self.take(top, gpn, 1)
        best: tuple[int, int, str, str] | None = None
        sites = [site] if site is not None else self.type_sites.get(gpu_type, [])
        for s in sites:
            ls = self.levels[(gpu_type, s)]
            if ls.count_ge(gpn) < k:
                continue
            for d in self.site_domains[(gpu_type, s)]:
                ld = self.levels[(gpu_type, s, d)]
                if ld.count_ge(gpn) >= k:
                    cand = (0, ld.waste(gpn, k), s, d)
                    if best is None or cand < best:
                        best = cand
            cand = (1, ls.waste(gpn, k), s, "")
            if best is None or cand < best:
                best = cand
        if best is None:
            return None
        key = (gpu_type, best[2], best[3]) if best[0] == 0 else (gpu_type, best[2])
        return self.take(self.levels[key], gpn, k)

    def take(self, lvl: Level, gpn: int, k: int) -> list[int]:
        """The k tightest nodes with ≥ gpn free (lowest id first among equals); heaps untouched."""
        out: list[int] = []
        free = self.free
        for f in range(gpn, len(lvl.heaps)):
            if not lvl.cnt[f]:
                continue
            heap = lvl.heaps[f]
            popped: list[int] = []
            while heap and len(out) < k:
                nid = heapq.heappop(heap)
                if free[nid] == f and (not popped or popped[-1] != nid):
                    popped.append(nid)
                    out.append(nid)
            for nid in popped:
                heapq.heappush(heap, nid)
            if len(out) >= k:
                break
        return out

    # -- updates -----------------------------------------------------------------------------

    def _set_free(self, nid: int, new: int) -> None:
        old = self.free[nid]
        if new == old:
            return
        self.free[nid] = new
        for lvl in self.node_levels[nid]:
            lvl.cnt[old] -= 1
            lvl.cnt[new] += 1
            if new:
                heapq.heappush(lvl.heaps[new], nid)

    def allocate(self, nid: int, g: int) -> tuple[int, ...]:
        """Give g free GPUs of the node (lowest indices: neighbours on the NVLink fabric)."""
        gpus = self.free_gpus[nid]
        taken = tuple(gpus[:g])
        del gpus[:g]
        self._set_free(nid, len(gpus))
        return taken

    def hide(self, nid: int, g: int) -> int:
        """Withhold up to g free GPUs for the rest of the cycle (claims and reservations)."""
        g = min(g, self.free[nid])
        if g > 0:
            t = self.nodes[nid].gpu_type
            self.hidden[t] = self.hidden.get(t, 0) + g
            gpus = self.free_gpus[nid]
            self.withheld.setdefault(nid, []).extend(gpus[-g:])
            del gpus[-g:]
            self._set_free(nid, self.free[nid] - g)
        return g

    def allocate_withheld(self, nid: int, g: int) -> tuple[int, ...]:
        """Give g GPUs of the node: free ones first, then withheld ones (short backfill)."""
        gpus = self.free_gpus[nid]
        from_free = min(g, len(gpus))
        taken = gpus[:from_free]
        del gpus[:from_free]
        rest = g - from_free
        if rest:
            held = self.withheld[nid]
            taken += held[:rest]
            del held[:rest]
            t = self.nodes[nid].gpu_type
            self.hidden[t] -= rest
        self._set_free(nid, len(gpus))
        return tuple(sorted(taken))
