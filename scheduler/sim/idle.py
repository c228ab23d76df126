"""Idle GPUs while work waits, by cause: why the GPUs a waiting job might want stay empty.

The simulator tells this ledger every change of the free GPUs and of the queue; after each
change it classifies every idle GPU and integrates the counts over time. The classification is
per node: a node's free GPUs belong to the most actionable cause found among the waiting jobs
that could use them (see docs/SIMULATION.md, "Idle GPUs while work waits"):

- `unhealthy`: on a node the core may not use (draining, drained, down) or an unhealthy GPU;
- `fragmentation`: no waiting job fits a gang on the free GPUs that includes this node;
- `assembling`: the same, on a node the last cycle reserved for a waiting job (an EASY reservation
  or a protected gang): its free GPUs are held for that job while the rest of the node, or the
  gang's other nodes, free up;
- `quota`: only jobs whose org may not hold more (its limit, or its guarantee where the job may
  not borrow) fit;
- `cycle_gap`: a job that may start fits, but no cycle has looked since it arrived or since
  GPUs were freed;
- `reservation`: the last cycle saw such a job and, under a policy that backfills, left it
  waiting: backfill starts every job that fits unless the GPUs are held for a job ahead of it
  (an EASY reservation, or GPUs withheld for a preemptor);
- `other`: the last cycle saw such a job and left it under a policy without backfill (strict
  FIFO, where the blocked head holds every job behind it).

The core's reason codes are not used: a borrower kept off reserved GPUs reads `Resources`, so
they do not separate reservations from other waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from scheduler.core.types import Node

IDLE_CAUSES = (
    "fragmentation",
    "assembling",
    "quota",
    "other",
    "reservation",
    "cycle_gap",
    "unhealthy",
)
# Ranks: when several jobs could use a node, the cause ranked highest names its idle GPUs.
_FRAGMENTATION, _ASSEMBLING, _QUOTA, _OTHER, _RESERVATION, _CYCLE_GAP, _UNHEALTHY = range(7)


class Shape(NamedTuple):
    """What decides whether a waiting job fits and whether its org may take more."""

    org: int
    gpus_per_node: int
    nodes: int
    gpu_type: str | None
    site: str | None
    cap: float  # the most GPUs its org may hold for this job (limit, or guarantee)


NO_SHAPE = Shape(0, 0, 0, None, None, 0.0)  # a job set aside before it ever queues


class IdleLedger:
    """GPU-seconds idle while work waits, per cause, integrated between the simulator's steps."""

    def __init__(self, nodes: Sequence[Node], backfill: bool) -> None:
        self.left_waiting = _RESERVATION if backfill else _OTHER
        groups: dict[tuple[str, str], int] = {}
        self.group_keys: list[tuple[str, str]] = []
        self.node_group: dict[int, int] = {}
        self.node_free: dict[int, int] = {}
        self.unhealthy_gpus = 0
        top = max((len(n.gpus) for n in nodes), default=0)
        for node in nodes:
            usable = 0 if not node.schedulable else len(node.gpus) - len(node.unhealthy_gpus)
            self.unhealthy_gpus += len(node.gpus) - usable
            key = (node.gpu_type, node.site)
            if key not in groups:
                groups[key] = len(self.group_keys)
                self.group_keys.append(key)
            self.node_group[node.id] = groups[key]
            self.node_free[node.id] = usable
        # levels[g][f]: nodes of group g with exactly f usable free GPUs.
        self.levels = [[0] * (top + 1) for _ in self.group_keys]
        for node_id, free in self.node_free.items():
            self.levels[self.node_group[node_id]][free] += 1
        self.top = top
        self.shapes: dict[Shape, int] = {}  # waiting jobs by shape
        self.unseen: dict[Shape, int] = {}  # of those, queued since the last look
        self.freed_since_look = False
        self.reserved: frozenset[int] = frozenset()  # nodes the last cycle reserved
        self.gpu_s = [0.0] * len(IDLE_CAUSES)
        self.rates = [0] * len(IDLE_CAUSES)
        self.since = 0.0

    # -- what the simulator reports ------------------------------------------------------

    def take(self, node_id: int, gpus: int) -> None:
        self._move(node_id, -gpus)

    def give(self, node_id: int, gpus: int) -> None:
        self._move(node_id, gpus)
        self.freed_since_look = True

    def _move(self, node_id: int, delta: int) -> None:
        level = self.levels[self.node_group[node_id]]
        free = self.node_free[node_id]
        level[free] -= 1
        level[free + delta] += 1
        self.node_free[node_id] = free + delta

    def queue(self, shape: Shape, delta: int) -> None:
        """A job of `shape` joins (+1) or leaves (-1) the queue; one that joins is unseen."""
        _bump(self.shapes, shape, delta)
        if delta > 0:
            _bump(self.unseen, shape, delta)

    def reserve(self, nodes: Iterable[int]) -> None:
        """The nodes a cycle left reserved for waiting jobs, until the next cycle."""
        self.reserved = frozenset(nodes)

    def looked(self) -> None:
        """A cycle saw the current state (or the simulator proved the core could do nothing)."""
        self.unseen.clear()
        self.freed_since_look = False

    def update(self, t: float, waiting: bool, org_alloc: Sequence[int]) -> None:
        """Integrate up to `t`, then classify the idle GPUs of the state from `t` on."""
        dt = t - self.since
        if dt > 0:
            for cause, gpus in enumerate(self.rates):
                if gpus:
                    self.gpu_s[cause] += gpus * dt
        self.since = t
        self.rates = self._classify(org_alloc) if waiting else [0] * len(IDLE_CAUSES)

    def by_cause(self) -> dict[str, float]:
        """GPU-seconds idle while work waited, per cause."""
        return dict(zip(IDLE_CAUSES, self.gpu_s, strict=True))

    # -- classification -------------------------------------------------------------------

    def _classify(self, org_alloc: Sequence[int]) -> list[int]:
        rates = [0] * len(IDLE_CAUSES)
        rates[_UNHEALTHY] = self.unhealthy_gpus
        top = self.top
        # at_least[g][n]: nodes of group g with n or more free GPUs.
        at_least = []
        for level in self.levels:
            running, column = 0, [0] * (top + 2)
            for free in range(top, -1, -1):
                running += level[free]
                column[free] = running
            at_least.append(column)
        # best[g][n]: the highest rank of a job needing n GPUs per node that fits in group g.
        best = [[-1] * (top + 1) for _ in self.group_keys]
        for shape, count in self.shapes.items():
            if count <= 0 or shape.gpus_per_node > top:
                continue
            rank = -1
            for g, (gpu_type, site) in enumerate(self.group_keys):
                if (shape.gpu_type is not None and shape.gpu_type != gpu_type) or (
                    shape.site is not None and shape.site != site
                ):
                    continue
                if at_least[g][shape.gpus_per_node] < shape.nodes:
                    continue
                if rank < 0:
                    rank = self._rank(shape, org_alloc)
                row = best[g]
                row[shape.gpus_per_node] = max(row[shape.gpus_per_node], rank)
        for g, level in enumerate(self.levels):
            rank = _FRAGMENTATION
            row = best[g]
            for free in range(1, top + 1):
                rank = max(rank, row[free])
                row[free] = rank  # now: the cause of a node with this many free GPUs
                rates[rank] += free * level[free]
        # A reserved node whose free GPUs no waiting job could use: assembled for its holder.
        for node_id in self.reserved:
            free = self.node_free[node_id]
            if free and best[self.node_group[node_id]][free] <= _FRAGMENTATION:
                rates[_FRAGMENTATION] -= free
                rates[_ASSEMBLING] += free
        return rates

    def _rank(self, shape: Shape, org_alloc: Sequence[int]) -> int:
        if org_alloc[shape.org] + shape.gpus_per_node * shape.nodes > shape.cap:
            return _QUOTA
        if self.freed_since_look or self.unseen.get(shape, 0) > 0:
            return _CYCLE_GAP
        return self.left_waiting


def _bump(counter: dict[Shape, int], key: Shape, delta: int) -> None:
    count = counter.get(key, 0) + delta
    if count > 0:
        counter[key] = count
    else:
        counter.pop(key, None)
