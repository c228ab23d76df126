"""The scheduler a caller keeps across cycles: what did not change since the last one is reused.

The server's scheduling loop, the simulator and the bench each own one `Scheduler`; a one-off
caller uses `scheduler.core.schedule`, which keeps nothing. Decisions are the same either way
(a hypothesis property in `tests/core/test_properties.py` runs one kept `Scheduler` over random
sequences of changes and compares every cycle with one that keeps nothing).
"""

from __future__ import annotations

import threading

from scheduler.core.capacity import Layout
from scheduler.core.cycle import Cycle
from scheduler.core.occupied import Occupied
from scheduler.core.pending import PendingClasses, few_classes
from scheduler.core.quota import Paths
from scheduler.core.running import RunningTables
from scheduler.core.types import Decisions, Org, RunningChanges, Snapshot
from scheduler.core.usage import TreeShares

# A kept `Occupied` is built anew once its heaps hold this many stale entries per node: a
# copy per cycle costs what the heaps hold.
_STALE_PER_NODE = 4
# The queue is visited class by class when its classes have on average at least this many
# jobs: on the simulator's queues (about 290 jobs in 32 classes) that visits a few jobs per
# class; on the bench's (about one class per job) the heap of classes costs more than the sort.
_JOBS_PER_CLASS = 2


class Scheduler:
    """Runs cycles, keeping what depends on the nodes alone from one cycle to the next.

    The caller owns it (the simulator, the bench, the server's scheduling loop): the layout of
    the last `nodes` tuple is reused while the next snapshot passes the same tuple object or an
    equal one. Tuples and nodes are immutable and the tuple itself is kept, so identity means
    "no node changed" at no cost; the server loads fresh Node objects every cycle, and comparing
    them (about 1 ms at 4,096 nodes) is what spares it the layout's build (about 25 ms). The
    org tree is kept while no org's structure changed, and the running jobs' tables while the
    caller says what changed in them (`Snapshot.running_changes`).
    """

    def __init__(self, *, by_class: bool | None = None) -> None:
        """`by_class`: visit the pending queue class by class (`scheduler.core.pending`):
        None when the queue has few classes for its jobs and the policy lets most of a class
        be settled unvisited (borrowing: a borrower class waits whole), True always, False
        never (tests and benches; decisions are the same)."""
        self.by_class = by_class
        self._classes: PendingClasses | None = None
        self.classes_built = 0  # pending classes built from the whole queue (a figure)
        self._last: tuple[tuple[object, ...], Layout] | None = None
        self.layouts_built = 0  # how often the nodes changed (a figure for tests and benches)
        self._tree: tuple[tuple[object, ...], Paths, TreeShares] | None = None
        self.trees_built = 0  # how often the org tree changed (a figure for tests)
        self._run: RunningTables | None = None
        self._occupied: tuple[RunningTables, Occupied] | None = None
        self.running_built = 0  # running tables built from every running job (figures for
        self.running_advanced = 0  # tests and benches) and corrected by what changed
        self._lock = threading.Lock()

    def layout(self, snap: Snapshot) -> Layout:
        nodes = snap.nodes
        last = self._last  # one read: cycles of one scheduler may run in different threads
        if last is not None and (last[0] is nodes or last[0] == nodes):
            return last[1]
        layout = Layout(nodes)
        self.layouts_built += 1
        if isinstance(nodes, tuple):
            self._last = (nodes, layout)
        return layout

    def tree(self, snap: Snapshot) -> tuple[Paths, TreeShares]:
        """The org tree's paths and shares, kept while every org keeps its id, parent, shares,
        guarantees and limits (in the same order): usage alone changes from cycle to cycle."""
        key = tuple((o.id, o.parent_id, o.shares, o.guaranteed, o.limit) for o in snap.orgs)
        last = self._tree  # one read, as in `layout`
        if last is not None and last[0] == key:
            return last[1], last[2]
        first: dict[int, Org] = {}
        for o in snap.orgs:
            first.setdefault(o.id, o)
        got = self._tree = (key, Paths(first), TreeShares(snap.orgs))
        self.trees_built += 1
        return got[1], got[2]

    def running_tables(self, snap: Snapshot) -> RunningTables:
        """The running jobs' tables, corrected from the last cycle's where the snapshot says
        what changed since it (`Snapshot.running_changes`) or passes the same running tuple;
        else built from every running job."""
        kept = self._run
        min_runtime_s = snap.config.min_runtime_s
        if kept is not None and kept.min_runtime_s == min_runtime_s:
            changes = snap.running_changes
            if changes is None and snap.running is kept.running:
                changes = RunningChanges(kept.running)
            if changes is not None and kept.advance(snap.running, changes, snap.now):
                self.running_advanced += 1
                return kept
        run = RunningTables(snap.running, snap.now, min_runtime_s)
        self.running_built += 1
        self._run = run if isinstance(snap.running, tuple) else None
        return run

    def occupied(self, layout: Layout, run: RunningTables) -> Occupied:
        """The layout with the running jobs in, corrected for the nodes whose jobs changed
        while the layout and the running tables are the ones it was made from."""
        last = self._occupied
        if last is not None and last[0] is run and last[1].layout is layout:
            occupied = last[1]
            if occupied.stale_pushes <= _STALE_PER_NODE * len(layout.nodes):
                occupied.correct(run.held, run.touched)
                return occupied
        occupied = Occupied(layout, run.held)
        self._occupied = (run, occupied) if run is self._run else None
        return occupied

    def pending_classes(self, snap: Snapshot) -> PendingClasses | None:
        """The pending queue by class, corrected from the last cycle's; None where a cycle
        should take the queue job by job (see `by_class`)."""
        if self.by_class is False:
            return None
        cfg = snap.config
        if self.by_class is None and not cfg.borrowing:
            # Jobs beyond their guarantee then wait on it, with the org's allocation at their
            # turn in the reasons: visited one by one, which through the heap of classes costs
            # more than the sorted queue (replays of the simulator's Philly cycles: slurm-like
            # +33 %, fifo +48 % instructions, its strict order blocked only late).
            return None
        kept = self._classes
        if kept is None or not kept.advance(snap.pending):
            self._classes = None
            if self.by_class is None and not few_classes(snap.pending, _JOBS_PER_CLASS):
                return None  # not worth building (the bench's queues: a class per job)
            kept = PendingClasses(snap.pending)
            self.classes_built += 1
            self._classes = kept if kept.valid and isinstance(snap.pending, tuple) else None
            if not kept.valid:
                return None
        if self.by_class is None and len(kept.classes) * _JOBS_PER_CLASS > len(snap.pending):
            return None
        return kept

    def schedule(self, snapshot: Snapshot) -> Decisions:
        """Decide starts, preemptions and every pending job's reasons for one snapshot (pure).

        One cycle at a time: the kept running tables are corrected in place.
        """
        with self._lock:
            layout = self.layout(snapshot)
            run = self.running_tables(snapshot)
            occupied = self.occupied(layout, run)
            classes = self.pending_classes(snapshot)
            return Cycle(snapshot, layout, self.tree(snapshot), run, occupied, classes).run()


def schedule(snapshot: Snapshot) -> Decisions:
    """One cycle with nothing kept from earlier ones (tests, one-off callers)."""
    return Cycle(snapshot, Layout(snapshot.nodes)).run()


__all__ = ["Scheduler", "schedule"]
