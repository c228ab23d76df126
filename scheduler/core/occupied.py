"""The free index's starting point: the node layout corrected for the GPUs running jobs hold.

A cycle that keeps nothing builds it from every node that holds GPUs; a `Scheduler` keeps it
with its running-job tables and corrects only the nodes whose jobs changed, so that a cycle's
free index costs a copy of a few hundred small lists rather than a pass over the busy nodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping

from scheduler.core.capacity import Layout


class Occupied:
    """Free GPUs per node, and the index's counts and heaps per level, with running jobs in.

    The heaps are lazy, as the free index's are: a node's entry under a count it no longer has
    is stale and skipped, so a correction only pushes the node under its new count. Kept and
    corrected for long, the heaps fill with stale entries: `stale_pushes` says how many, and the
    owner builds it anew past a bound.
    """

    def __init__(self, lay: Layout, held: Mapping[int, Collection[int]]) -> None:
        self.layout = lay
        self.free = lay.free.copy()
        self.cnts = [c.copy() for c in lay.level_cnt]
        self.heaps = [[h.copy() for h in hs] for hs in lay.level_heaps]
        self.busy: dict[int, Collection[int]] = {}  # GPUs running jobs hold, where that counts
        self.stale_pushes = 0
        free, cnts, heaps, node_lv, usable = (
            self.free,
            self.cnts,
            self.heaps,
            lay.node_lv,
            lay.usable,
        )
        push = heapq.heappush
        for nid, busy in held.items():
            mine = usable.get(nid)
            if not mine:
                continue
            f = len(mine.difference(busy))
            old = free[nid]
            if f == old:
                continue
            self.busy[nid] = busy
            free[nid] = f
            for i in node_lv[nid]:
                c = cnts[i]
                c[old] -= 1
                c[f] += 1
                if f:
                    push(heaps[i][f], nid)  # its entry under `old` is stale: `take` skips it

    def correct(self, held: Mapping[int, Collection[int]], nodes: Iterable[int]) -> None:
        """Take in what running jobs now hold on `nodes` (the ones whose jobs changed)."""
        lay = self.layout
        free, cnts, heaps, busy_of = self.free, self.cnts, self.heaps, self.busy
        for nid in nodes:
            mine = lay.usable.get(nid)
            if not mine:
                continue
            busy = held.get(nid)
            if busy is None:
                busy_of.pop(nid, None)
                f = len(mine)
            else:
                busy_of[nid] = busy
                f = len(mine.difference(busy))
            old = free[nid]
            if f == old:
                continue
            free[nid] = f
            for i in lay.node_lv[nid]:
                c = cnts[i]
                c[old] -= 1
                c[f] += 1
                if f:
                    heapq.heappush(heaps[i][f], nid)
                    self.stale_pushes += 1


__all__ = ["Occupied"]
