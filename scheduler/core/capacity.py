"""Index of free GPUs per type, site and domain: nodes counted by how many GPUs they have free.

A placement query costs O(distinct free counts x domains), never O(nodes): each level keeps
`cnt[f]` (how many nodes have exactly f free GPUs) and a lazy min-heap of node ids per f, so the
tightest node (best fit) with the lowest id comes out first. Jobs may need node features (agent
capabilities, strict isolation: `PendingJob.needs`); the nodes having a set of them form a feature
class, counted again in levels of their own, the only ones such a job is placed from: its
placement costs the same, and filters no node one by one. Within one cycle free
GPUs only ever go down (starts, claims, reservations), which keeps the lazy heaps and the "this
shape failed" memo valid.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from scheduler.core.types import MEMORY_NEED, Node, PendingJob, PolicyConfig, memory_need
from scheduler.core.usage import capacity_usage

if TYPE_CHECKING:
    from scheduler.core.occupied import Occupied


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


_NO_LEVELS: dict[tuple[str, ...], Level] = {}
_NO_STATIC: dict[tuple[str, str], list[int]] = {}
MEMORY_TIERS_MAX = 8
"""Memory tiers a layout makes at most, besides the largest share (`memory_tiers`)."""
_MEMORY_ANY = MEMORY_NEED + "any"
"""The tier above every reported share: only nodes that reported none (they fit any job)."""


def memory_tiers(shares: Iterable[int]) -> list[int]:
    """The tiers of memory per GPU placement tells nodes apart by: the distinct shares, or
    where there are more than MEMORY_TIERS_MAX + 1, the lowest share of each group of shares
    within a relative tolerance (the smallest of 1/1024, 1/256, ... that leaves at most
    MEMORY_TIERS_MAX), and the largest share. Each tier costs a feature class's levels and
    every node is counted in those of each tier it reaches: 4,096 nodes whose totals differ by
    a MiB (as one model's nodes under another firmware do) made 4,096 tiers and a layout of
    four minutes. A node counts as having its group's lowest share, so a job is never placed
    where it does not fit, at worst kept off a node with less than the tolerance to spare;
    the largest share stays a tier, so "no node could ever hold it" stays exact."""
    distinct = sorted(set(shares))
    if len(distinct) <= MEMORY_TIERS_MAX + 1:
        return distinct
    tolerance = 2**-10
    while True:
        tiers: list[int] = []
        for share in distinct[:-1]:
            if not tiers or share >= tiers[-1] * (1 + tolerance):
                tiers.append(share)
        if len(tiers) <= MEMORY_TIERS_MAX:
            return [*tiers, distinct[-1]]
        tolerance *= 4


class Layout:
    """What a cycle's index needs from the nodes alone, built once per `nodes` tuple.

    Levels, shape counts and each node's usable GPUs do not depend on the running jobs, so a
    `Scheduler` keeps the layout of the last `nodes` tuple it saw: the simulator and the server,
    which pass the same tuple object while no node changed, pay for it once; each cycle copies
    the counts and heaps (a few hundred small lists) and corrects them for the nodes that hold
    GPUs.
    """

    __slots__ = (
        "by_type",
        "cap_usage",
        "capacity",
        "class_nodes",
        "free",
        "gpus",
        "key_class",
        "keys",
        "level_cnt",
        "level_heaps",
        "max_g",
        "need_memo",
        "node_classes",
        "node_lv",
        "nodes",
        "site_domains",
        "static",
        "statics",
        "tiers",
        "type_sites",
        "types",
        "union",
        "usable",
        "varying",
    )

    def __init__(self, nodes: Iterable[Node]) -> None:
        node_list = sorted(nodes, key=lambda n: n.id)
        self.max_g = max_g = max((len(n.gpus) for n in node_list), default=0)
        self.nodes: dict[int, Node] = {}
        for n in node_list:
            self.nodes.setdefault(n.id, n)
        self._classes()
        self.gpus: dict[int, tuple[int, ...]] = {}  # usable GPUs when nothing runs
        self.usable: dict[int, frozenset[int]] = {}
        self.free: dict[int, int] = {}
        self.capacity: dict[str, int] = {}  # every GPU of the type, usable or not
        # Static shape check per feature class: nodes by GPU count per (type, site), whatever
        # their state. Class 0 (every node) is `static`.
        self.statics: dict[int, dict[tuple[str, str], list[int]]] = {0: {}}
        self.static = self.statics[0]
        slot: dict[tuple[int, tuple[str, ...]], int] = {}
        self.keys: list[tuple[str, ...]] = []
        self.key_class: list[int] = []  # per level: the feature class whose nodes it counts
        self.level_cnt: list[list[int]] = []
        self.level_heaps: list[list[list[int]]] = []
        self.node_lv: dict[int, tuple[int, ...]] = {}
        for n in self.nodes.values():
            self.capacity[n.gpu_type] = self.capacity.get(n.gpu_type, 0) + len(n.gpus)
            ids = []
            three: tuple[tuple[str, ...], ...] = (
                (n.gpu_type,),
                (n.gpu_type, n.site),
                (n.gpu_type, n.site, n.domain),
            )
            for c in self.node_classes.get(n.id, (0,)):
                st = self.statics.setdefault(c, {}).setdefault(
                    (n.gpu_type, n.site), [0] * (max_g + 1)
                )
                st[len(n.gpus)] += 1
                for key in three:
                    i = slot.get((c, key))
                    if i is None:
                        i = slot[(c, key)] = len(self.keys)
                        self.keys.append(key)
                        self.key_class.append(c)
                        self.level_cnt.append([0] * (max_g + 1))
                        self.level_heaps.append([[] for _ in range(max_g + 1)])
                    ids.append(i)
            self.node_lv[n.id] = tuple(ids)
            if n.schedulable:
                gpus = tuple(sorted(g for g in set(n.gpus) if g not in n.unhealthy_gpus))
            else:
                gpus = ()
            self.gpus[n.id] = gpus
            self.usable[n.id] = frozenset(gpus)
            f = self.free[n.id] = len(gpus)
            for i in ids:
                self.level_cnt[i][f] += 1
                if f:
                    self.level_heaps[i][f].append(n.id)  # ids ascend: already a heap
        self.type_sites: dict[str, list[str]] = {}
        self.site_domains: dict[tuple[str, str], list[str]] = {}
        for key, c in zip(self.keys, self.key_class, strict=True):
            if c:
                continue  # a subset of class 0's keys
            if len(key) == 2:
                self.type_sites.setdefault(key[0], []).append(key[1])
            elif len(key) == 3:
                self.site_domains.setdefault((key[0], key[1]), []).append(key[2])
        for sites in self.type_sites.values():
            sites.sort()
        for domains in self.site_domains.values():
            domains.sort()
        self.types = sorted(self.capacity)
        self.cap_usage: dict[tuple[object, ...], float] = {}  # per (half-life, GPU weights)
        self.by_type: dict[str, list[int]] = {}
        for n in node_list:
            if n.schedulable and self.nodes.get(n.id) is n:
                self.by_type.setdefault(n.gpu_type, []).append(n.id)

    def _classes(self) -> None:
        """Feature classes: the node sets a job's needs can select, each counted once.

        Only features some nodes have and others lack (`varying`) select anything; each subset
        of them picks the nodes having it all, and subsets picking the same nodes share a class.
        Class 0 is every node. When every node has every feature (the common case) class 0 is
        the only one, and placement costs what it would with no features at all.

        Memory per GPU is a chain of features rather than one: the cluster's reported shares
        are its tiers (`memory_tiers`, `memory_need(tier)`), a node has every tier up to its
        own share,
        and a node that reported none has every tier and `_MEMORY_ANY` (it fits any job, as
        before nodes reported). A job's need (`PendingJob.needs`) is read as the lowest tier
        that holds it (`need_class`), so one tier at a time is combined with the other features:
        classes grow with the distinct shares, not with their subsets.
        """
        shares = {nid: n.memory_per_gpu_bytes for nid, n in self.nodes.items()}
        self.tiers = memory_tiers(s for s in shares.values() if s is not None)
        feats: dict[int, frozenset[str]] = {}
        for nid, n in self.nodes.items():
            share = shares[nid]
            if not self.tiers:
                feats[nid] = n.features
            elif share is None:
                tiers = [memory_need(t) for t in self.tiers]
                feats[nid] = n.features.union(tiers, (_MEMORY_ANY,))
            else:
                feats[nid] = n.features.union(memory_need(t) for t in self.tiers if t <= share)
        every = list(feats.values())
        self.union: frozenset[str] = frozenset().union(*every)
        common = every[0].intersection(*every[1:]) if every else frozenset()
        self.varying: frozenset[str] = self.union - common
        self.need_memo: dict[frozenset[str], int] = {}
        self.node_classes: dict[int, tuple[int, ...]] = {}
        self.class_nodes: list[int] = [len(feats)]  # nodes per class
        if not self.varying:
            return
        chain = [memory_need(t) for t in self.tiers] + [_MEMORY_ANY]
        memory = [f for f in chain if f in self.varying]
        names = sorted(self.varying.difference(memory))
        by_members: dict[tuple[int, ...], int] = {tuple(feats): 0}
        for mask in range(1 << len(names)):
            plain = frozenset(f for i, f in enumerate(names) if mask >> i & 1)
            for tier in (None, *memory):
                need = plain if tier is None else plain | {tier}
                if not need:
                    continue
                members = tuple(nid for nid, have in feats.items() if need <= have)
                c = by_members.get(members)
                if c is None:
                    c = by_members[members] = len(self.class_nodes)
                    self.class_nodes.append(len(members))
                self.need_memo[need] = c
        for members, c in by_members.items():
            for nid in members:
                self.node_classes[nid] = (*self.node_classes.get(nid, ()), c)

    def need_class(self, needs: frozenset[str]) -> int:
        """The feature class of the nodes that have every feature in `needs`."""
        if not needs:
            return 0
        c = self.need_memo.get(needs)
        if c is None:
            have = needs
            memory = [f for f in needs if f.startswith(MEMORY_NEED)]
            if memory:
                have = needs.difference(memory)
                tier = self.memory_tier(max(int(f.removeprefix(MEMORY_NEED)) for f in memory))
                if tier is not None:
                    have = have | {tier}
            # A feature no node has: -1, the class of no nodes.
            c = self.need_memo.get(have & self.varying, 0) if have <= self.union else -1
            self.need_memo[needs] = c
        return c

    def memory_tier(self, per_gpu_bytes: int) -> str | None:
        """The feature of the nodes whose share holds `per_gpu_bytes` per GPU: the lowest tier
        at least that large, else `_MEMORY_ANY` (only nodes that reported no share; where every
        node reported one, a feature no node has). None: no node reported a share, all fit."""
        if not self.tiers:
            return None
        i = bisect.bisect_left(self.tiers, per_gpu_bytes)
        return memory_need(self.tiers[i]) if i < len(self.tiers) else _MEMORY_ANY

    def largest_share(self) -> int | None:
        """The largest memory per GPU a node reported; None where none did."""
        return self.tiers[-1] if self.tiers else None

    def class_size(self, c: int) -> int:
        """How many nodes (whatever their state) a feature class holds."""
        return self.class_nodes[c] if c >= 0 else 0


class FreeIndex:
    def __init__(self, lay: Layout, occupied: Occupied, kept: bool = False) -> None:
        """`occupied`: the layout with running jobs in; `kept`: it outlives this cycle (a
        `Scheduler` keeps it), so the index works on copies."""
        self._layout = lay
        self.max_g = lay.max_g
        self.nodes = lay.nodes
        self.capacity = lay.capacity
        self.static = lay.static
        self.statics = lay.statics
        self.node_classes = lay.node_classes
        self.type_sites = lay.type_sites
        self.site_domains = lay.site_domains
        self.types = lay.types
        self.by_type = lay.by_type
        self._gpus = lay.gpus
        self.free_gpus: dict[int, list[int]] = {}  # nodes whose GPUs changed; others: `_gpus`
        if kept:
            self.free = occupied.free.copy()
            cnts = [c.copy() for c in occupied.cnts]
            heaps = [[h.copy() for h in hs] for hs in occupied.heaps]
            self._busy: Mapping[int, Collection[int]] = occupied.busy.copy()
        else:
            self.free, cnts, heaps = occupied.free, occupied.cnts, occupied.heaps
            self._busy = occupied.busy
        node_lv = lay.node_lv
        # Per feature class, its levels; class 0 (every node) is `levels`.
        self.class_levels: dict[int, dict[tuple[str, ...], Level]] = {0: {}}
        self.levels = self.class_levels[0]
        lv: list[Level] = []
        for key, k, c, h in zip(lay.keys, lay.key_class, cnts, heaps, strict=True):
            lvl = Level.__new__(Level)
            lvl.cnt = c
            lvl.heaps = h
            levels = self.class_levels.get(k)
            if levels is None:
                levels = self.class_levels[k] = {}
            levels[key] = lvl
            lv.append(lvl)
        self._lv = lv
        self._node_lv = node_lv
        self.hidden: dict[str, int] = {}  # GPUs withheld per type (claims, reservations)
        self.withheld: dict[int, list[int]] = {}  # node → GPU indices withheld

    def capacity_usage(self, config: PolicyConfig) -> float:
        """`usage.capacity_usage` of the nodes, computed once per nodes tuple and policy."""
        memo = self._layout.cap_usage
        key = (config.half_life_s, tuple(sorted(config.gpu_weights.items())))
        got = memo.get(key)
        if got is None:
            got = memo[key] = capacity_usage(self.nodes.values(), config)
        return got

    def _gpu_list(self, nid: int) -> list[int]:
        gpus = self.free_gpus.get(nid)
        if gpus is None:
            busy = self._busy.get(nid)
            base = self._gpus[nid]
            gpus = list(base) if busy is None else [g for g in base if g not in busy]
            self.free_gpus[nid] = gpus
        return gpus

    # -- queries -----------------------------------------------------------------------------

    def job_class(self, job: PendingJob) -> int:
        """The feature class of the nodes the job may run on (0: every node)."""
        if not job.capabilities and not job.needs_isolation and job.memory_bytes is None:
            return 0
        return self._layout.need_class(job.needs)

    def need_class(self, needs: frozenset[str]) -> int:
        return self._layout.need_class(needs)

    def class_size(self, c: int) -> int:
        return self._layout.class_size(c)

    def largest_share(self) -> int | None:
        return self._layout.largest_share()

    def in_class(self, nid: int, c: int) -> bool:
        """Whether the node has every feature of class `c`."""
        return c == 0 or c in self.node_classes.get(nid, ())

    def levels_for(self, c: int) -> dict[tuple[str, ...], Level]:
        """The levels a job of feature class `c` may be placed from (none for the empty class)."""
        return self.class_levels.get(c, _NO_LEVELS)

    def possible(self, gpu_type: str, site: str | None, gpn: int, k: int, c: int = 0) -> bool:
        """Could the cluster run this shape at all, were every node empty and healthy?"""
        if gpn > self.max_g or gpn <= 0 or k <= 0:
            return False
        static = self.statics.get(c, _NO_STATIC)
        sites = [site] if site is not None else self.type_sites.get(gpu_type, [])
        for s in sites:
            st = static.get((gpu_type, s))
            if st is not None and sum(st[gpn:]) >= k:
                return True
        return False

    def largest_gang(self, gpu_type: str, site: str | None, gpn: int, c: int = 0) -> int:
        """Most nodes (of feature class `c`) with ≥ gpn free GPUs inside one site now."""
        if gpn > self.max_g:
            return 0
        levels = self.levels_for(c)
        sites = [site] if site is not None else self.type_sites.get(gpu_type, [])
        best = 0
        for s in sites:
            lvl = levels.get((gpu_type, s))
            if lvl is not None:
                best = max(best, lvl.count_ge(gpn))
        return best

    def free_of_type(self, gpu_type: str) -> int:
        lvl = self.levels.get((gpu_type,))
        if lvl is None:
            return 0
        return sum(f * c for f, c in enumerate(lvl.cnt))

    def find(
        self, gpu_type: str, site: str | None, gpn: int, k: int, c: int = 0
    ) -> list[int] | None:
        """Nodes for a gang of k x gpn: one node, else one domain, else one site; best fit.

        `c`: from the nodes of that feature class only (their levels hold a subset of the keys).
        """
        if gpn > self.max_g:
            return None
        levels = self.levels_for(c)
        top = levels.get((gpu_type,) if site is None else (gpu_type, site))
        if top is None or top.count_ge(gpn) < k:
            return None
        if k == 1:
            return self.take(top, gpn, 1)
        best: tuple[int, int, str, str] | None = None
        sites = [site] if site is not None else self.type_sites.get(gpu_type, [])
        for s in sites:
            ls = levels.get((gpu_type, s))
            if ls is None or ls.count_ge(gpn) < k:
                continue
            for d in self.site_domains[(gpu_type, s)]:
                ld = levels.get((gpu_type, s, d))
                if ld is not None and ld.count_ge(gpn) >= k:
                    cand = (0, ld.waste(gpn, k), s, d)
                    if best is None or cand < best:
                        best = cand
            cand = (1, ls.waste(gpn, k), s, "")
            if best is None or cand < best:
                best = cand
        if best is None:
            return None
        key = (gpu_type, best[2], best[3]) if best[0] == 0 else (gpu_type, best[2])
        return self.take(levels[key], gpn, k)

    def find_by_end(
        self,
        gpu_type: str,
        site: str | None,
        gpn: int,
        c: int,
        end: float,
        drains_at: Callable[[int], float],
    ) -> list[int] | None:
        """One node for a job of gpn GPUs ending at `end`, packing jobs that end together.

        Among the partly used nodes with room, one whose running jobs all end no earlier than
        the job does (`drains_at`: when its last one ends) takes it without delaying the moment
        it frees whole: the tightest such node, then the one draining soonest. Failing that, the
        node whose drain the job delays least (the one draining last), then the tightest. Empty
        nodes come last, as under best fit. Scans the partly used nodes with room, which are few
        on a busy cluster; the lazy heaps are read, not popped.
        """
        if gpn > self.max_g:
            return None
        levels = self.levels_for(c)
        top = levels.get((gpu_type,) if site is None else (gpu_type, site))
        if top is None or top.count_ge(gpn) < 1:
            return None
        free = self.free
        gpus = self._layout.gpus
        best: tuple[int, float, float, int] | None = None
        # A node with max_g free is empty (never scanned); smaller nodes may be empty below it.
        for f in range(gpn, self.max_g):
            if not top.cnt[f]:
                continue
            for nid in top.heaps[f]:
                if free[nid] != f or f == len(gpus[nid]):
                    continue  # stale entry, or an empty node
                drain = drains_at(nid)
                if end <= drain:
                    cand = (0, float(f), drain - end, nid)
                else:
                    cand = (1, end - drain, float(f), nid)
                if best is None or cand < best:
                    best = cand
        if best is None:
            return self.take(top, gpn, 1)
        return [best[3]]

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
        lv = self._lv
        for i in self._node_lv[nid]:
            lvl = lv[i]
            lvl.cnt[old] -= 1
            lvl.cnt[new] += 1
            if new:
                heapq.heappush(lvl.heaps[new], nid)

    def allocate(self, nid: int, g: int) -> tuple[int, ...]:
        """Give g free GPUs of the node (lowest indices: neighbours on the NVLink fabric)."""
        gpus = self._gpu_list(nid)
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
            gpus = self._gpu_list(nid)
            self.withheld.setdefault(nid, []).extend(gpus[-g:])
            del gpus[-g:]
            self._set_free(nid, self.free[nid] - g)
        return g

    def allocate_withheld(self, nid: int, g: int) -> tuple[int, ...]:
        """Give g GPUs of the node: free ones first, then withheld ones (short backfill)."""
        gpus = self._gpu_list(nid)
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
